"""The inputs the table contract suite feeds every backend: tricky string keys and bad writes.

Each bad write is ``(call, error)``: ``call(table)`` must raise ``error`` (an
:class:`embkv.EmbkvError`) and change nothing. A suite subclass may add cases of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import EmbkvError, KeyTypeError, SchemaError
from ..interface import EmbeddingTable

__all__ = ["BAD_INT_WRITES", "BAD_STR_WRITES", "BAD_TAG_WRITES", "BYTES_KEYS", "ONES", "TRICKY_KEYS"]

ONES = np.ones((1, 4), dtype=np.float32)

TRICKY_KEYS: list[str | bytes] = [
    "", "a", "a\x00", "a\x00\x00", "\x00", "\x00a", "ab", "abc", "abd", "abcd", "abc ", " abc",
    "A", "ключ", "键", "🔑", "🔑🔑", "é", "e\u0301",  # NFC and NFD spell the same letter: different keys
    "x" * 5000, "x" * 4999, "x" * 4999 + "y", "tab\tkey", "line\nkey",
]
BYTES_KEYS: list[str | bytes] = [b"\xff", b"\xff\x00", b"\xfe\xff\x00\x01", b"\x80abc"]  # not UTF-8: back as bytes


Call = Callable[[EmbeddingTable], object]

BAD_INT_WRITES: dict[str, tuple[Call, type[EmbkvError]]] = {
    "wrong dim": (lambda t: t.put([1], np.ones((1, 5))), SchemaError),
    "too few vectors": (lambda t: t.put([1, 2], ONES), SchemaError),
    "too many vectors": (lambda t: t.put([1], np.ones((2, 4))), SchemaError),
    "3-d vectors": (lambda t: t.put([1], np.ones((1, 1, 4))), SchemaError),
    "flat vector for two keys": (lambda t: t.put([1, 2], np.ones(8)), SchemaError),
    "scalar vector": (lambda t: t.put([1], 1.0), SchemaError),
    "string vectors": (lambda t: t.put([1], [["a", "b", "c", "d"]]), SchemaError),
    "object vectors": (lambda t: t.put([1], np.array([[1, None, 2, 3]], dtype=object)), SchemaError),
    "bool vectors": (lambda t: t.put([1], np.ones((1, 4), dtype=bool)), SchemaError),
    "complex vectors": (lambda t: t.put([1], np.ones((1, 4), dtype=complex)), SchemaError),
    "ragged vectors": (lambda t: t.put([1, 2], [[1, 2, 3, 4], [1, 2, 3]]), SchemaError),
    "str keys": (lambda t: t.put(["1"], ONES), KeyTypeError),
    "bare str key": (lambda t: t.put("1", ONES), KeyTypeError),
    "bytes key": (lambda t: t.put(b"1", ONES), KeyTypeError),
    "float keys": (lambda t: t.put([1.0], ONES), KeyTypeError),
    "float array keys": (lambda t: t.put(np.array([1.5]), ONES), KeyTypeError),
    "2-d keys": (lambda t: t.put(np.array([[1], [2]]), np.ones((2, 4))), KeyTypeError),
    "ragged keys": (lambda t: t.put([[1], [2, 3]], np.ones((2, 4))), KeyTypeError),
    "bool keys": (lambda t: t.put([True], ONES), KeyTypeError),
    "None key": (lambda t: t.put(None, ONES), KeyTypeError),
    "mixed keys": (lambda t: t.put([1, "a"], np.ones((2, 4))), KeyTypeError),
    "uint64 above int64": (lambda t: t.put(np.array([2**63], dtype=np.uint64), ONES), KeyTypeError),
    "int above uint64": (lambda t: t.put([2**64], ONES), KeyTypeError),
    "delete str keys": (lambda t: t.delete(["1"]), KeyTypeError),
    "delete float keys": (lambda t: t.delete([1.0, 2.0]), KeyTypeError),
    "delete 2-d keys": (lambda t: t.delete(np.array([[1, 2]])), KeyTypeError),
}

# on a table that keeps tags (an untagged one refuses every tag with SchemaError)
BAD_TAG_WRITES: dict[str, tuple[Call, type[EmbkvError]]] = {
    "negative tags": (lambda t: t.put([1, 2], np.ones((2, 4)), tags=[-1, 0]), SchemaError),
    "float tags": (lambda t: t.put([1, 2], np.ones((2, 4)), tags=[1.5, 2.0]), SchemaError),
    "too many tags": (lambda t: t.put([1, 2], np.ones((2, 4)), tags=[1, 2, 3]), SchemaError),
    "2-d tags": (lambda t: t.put([1, 2], np.ones((2, 4)), tags=[[1], [2]]), SchemaError),
    "str tags": (lambda t: t.put([1, 2], np.ones((2, 4)), tags=["a", "b"]), SchemaError),
    "bool tags": (lambda t: t.put([1, 2], np.ones((2, 4)), tags=[True, False]), SchemaError),
}

BAD_STR_WRITES: dict[str, tuple[Call, type[EmbkvError]]] = {
    "int keys": (lambda t: t.put([1], ONES), KeyTypeError),
    "int array keys": (lambda t: t.put(np.array([1, 2]), np.ones((2, 4))), KeyTypeError),
    "float keys": (lambda t: t.put([1.5], ONES), KeyTypeError),
    "None key": (lambda t: t.put([None], ONES), KeyTypeError),
    "mixed keys": (lambda t: t.put(["a", 1], np.ones((2, 4))), KeyTypeError),
    "nested keys": (lambda t: t.put([["a"]], ONES), KeyTypeError),
    "2-d key array": (lambda t: t.put(np.array([["a"], ["b"]]), np.ones((2, 4))), KeyTypeError),
    "not a sequence": (lambda t: t.put(5, ONES), KeyTypeError),
    "unencodable key": (lambda t: t.put(["ok", "\ud800"], np.ones((2, 4))), KeyTypeError),
    "wrong dim": (lambda t: t.put(["a"], np.ones((1, 3))), SchemaError),
    "string vectors": (lambda t: t.put(["a"], [["1", "2", "3", "4"]]), SchemaError),
    "delete int keys": (lambda t: t.delete([1]), KeyTypeError),
}
