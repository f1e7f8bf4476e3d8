"""``BackendTests``: the contract of :class:`embkv.EmbeddingTable`, as a pytest class to subclass.

A subclass overrides the ``make_table`` fixture (a factory of fresh, empty, writable tables)
and, for kinds whose tables other processes can open, :meth:`BackendTests.reader_opener`.
It may extend :meth:`BackendTests.state` with more of what a failed call must leave as it
was, and :meth:`BackendTests.check_invariants` with its own bookkeeping checks.
"""

from __future__ import annotations

import inspect
import multiprocessing
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any, Literal, Protocol

import numpy as np
import pytest

from ..errors import KeyTypeError, ReadOnlyError, SchemaError, TableClosedError
from ..file.format import make_tag
from ..file.store import open_store
from ..interface import EmbeddingTable
from .cases import BAD_INT_WRITES, BAD_STR_WRITES, BAD_TAG_WRITES, BYTES_KEYS, ONES, TRICKY_KEYS
from .data import check_vectors, encode

__all__ = ["BackendTests", "TableFactory", "open_store_table"]

HIT, OOV, STALE = 0, 1, 2  # embkv.HIT / OOV / STALE (the kernels' statuses)
INT64_MIN = int(np.iinfo(np.int64).min)
INT64_MAX = int(np.iinfo(np.int64).max)

class TableFactory(Protocol):
    """Makes a fresh, empty, writable table (a new one on every call).

    ``tagged=True`` asks for rows that keep a tag; a kind that has none returns an untagged
    table (``capabilities.tagged`` False) and the tag tests skip.
    """

    def __call__(self, key_type: Literal["int64", "str"] = "int64", dim: int = 16,
                 dtype: str = "float32", tagged: bool = False) -> EmbeddingTable: ...


def open_store_table(path: str, name: str, readonly: bool = True) -> EmbeddingTable:
    """Open table ``name`` of the store at ``path``: a :meth:`BackendTests.reader_opener` for file tables."""
    return open_store(path, readonly=readonly)[name]


def _serve_reads(opener: Callable[[], EmbeddingTable], conn: Connection) -> None:
    """Child process: open a reader, answer ``get`` requests until told to stop."""
    try:
        table = opener()
        try:
            table.put([0] if table.key_type == "int64" else ["0"], np.zeros((1, table.dim)))
            refused = "accepted"
        except ReadOnlyError:
            refused = "ReadOnlyError"
        conn.send(("ready", refused, table.capabilities.writable))
        while True:
            keys = conn.recv()
            if keys is None:
                break
            vectors, found = table.get(keys)
            conn.send((vectors, found, len(table)))
        table.close()
    except BaseException as exc:  # the parent fails the test with this
        conn.send(("error", f"{type(exc).__name__}: {exc}", None))
    finally:
        conn.close()


class BackendTests:
    """The conformance suite of :class:`embkv.EmbeddingTable`; see :mod:`embkv.testing`.

    A subclass overrides the ``make_table`` fixture, and may set or override:

    - ``quantized_dtypes``: the read-as-float32 dtypes the kind stores (``("int8", "bfloat16")``
      for embkv's file table); their tests skip otherwise;
    - :meth:`reader_opener`: how another process opens a table read-only (a picklable
      callable, e.g. ``functools.partial(open_store_table, store.path, table.name)``); the
      cross-process test skips without it;
    - :meth:`replace_all`: replace a table's whole content in one step (a bulk load), used
      by the random test;
    - :meth:`state` and :meth:`check_invariants`: more of what a failed call must leave as
      it was, and bookkeeping that always holds.

    ``tests/file/test_conformance.py`` in embkv's repository is a complete example.
    """

    @pytest.fixture
    def make_table(self) -> Iterator[TableFactory]:
        """Override with a fixture that yields a :class:`TableFactory` and cleans up after."""
        raise NotImplementedError("a BackendTests subclass overrides the make_table fixture")
        yield  # pragma: no cover

    quantized_dtypes: tuple[str, ...] = ()  # stored dtypes read back as float32 that this kind offers

    def reader_opener(self, table: EmbeddingTable) -> Callable[[], EmbeddingTable] | None:
        """A picklable callable that opens ``table`` read-only in another process (None: not possible)."""
        return None

    def replace_all(self, table: EmbeddingTable, keys: Any, vectors: np.ndarray) -> bool:
        """Replace ``table``'s whole content with these rows in one step; False if this kind cannot."""
        return False

    def state(self, table: EmbeddingTable) -> object:
        """Everything a failed call must leave as it was (subclasses add what their kind has)."""
        keys, vectors = table.export()
        content = sorted((repr(k), v.tobytes()) for k, v in zip(list(keys), vectors, strict=True))
        return content, len(table)

    def check_invariants(self, table: EmbeddingTable) -> None:
        """Bookkeeping that holds after any sequence of calls (subclasses add their own)."""
        assert len(table) == len(table.keys())
        assert table.info()["rows"] == len(table)

    # ---------------------------------------------------------------- shape of the interface

    def test_is_an_embedding_table(self, make_table: TableFactory) -> None:
        t = make_table(dim=16)
        assert isinstance(t, EmbeddingTable)
        assert (t.dim, t.dtype, t.key_type) == (16, np.dtype("float32"), "int64")
        assert t.capabilities.writable
        info = t.info()
        assert (info["dim"], info["dtype"], info["key_type"], info["rows"]) == (16, "float32", "int64", 0)
        assert info["name"] == t.name

    # ---------------------------------------------------------------- put / get / delete

    def test_put_get_roundtrip(self, make_table: TableFactory) -> None:
        t = make_table(dim=16)
        keys = np.array([5, 1, 99, 42], dtype=np.int64)
        t.put(keys, encode(keys, 3))
        vectors, found = t.get([1, 2, 42, 5, 99, 100])
        assert found.tolist() == [True, False, True, True, True, False]
        assert vectors.dtype == np.float32 and vectors.shape == (6, 16)
        assert check_vectors([1, 42, 5, 99], vectors[found]).tolist() == [3, 3, 3, 3]
        assert not vectors[~found].any()
        assert len(t) == 4

    @pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
    def test_dtypes_store_values_exactly(self, make_table: TableFactory, dtype: str) -> None:
        t = make_table(dim=7, dtype=dtype)
        assert t.dtype == np.dtype(dtype)
        vecs = np.random.default_rng(12345).standard_normal((50, 7)).astype(dtype)
        t.put(np.arange(50), vecs)
        got, found = t.get(np.arange(50))
        assert found.all()
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got.view(np.uint8), vecs.view(np.uint8))

    def test_float64_precision_kept(self, make_table: TableFactory) -> None:
        t = make_table(dim=2, dtype="float64")
        v = np.array([[1 + 2.0**-52, 1e300]])
        t.put([1], v)
        assert t.get([1])[0].tolist() == v.tolist()

    def test_values_are_cast_to_table_dtype(self, make_table: TableFactory) -> None:
        t = make_table(dim=3, dtype="float16")
        t.put([1, 2], np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32))
        t.put([3], np.array([[0.1, 0.2, 0.3]], dtype=np.float64))
        got, _ = t.get([1, 2, 3])
        assert got.dtype == np.float16
        assert got[:2].tolist() == [[1, 2, 3], [4, 5, 6]]
        np.testing.assert_array_equal(got[2], np.array([0.1, 0.2, 0.3], dtype=np.float16))

    def test_scalar_key_and_1d_vector(self, make_table: TableFactory) -> None:
        t = make_table(dim=4)
        t.put(7, [1, 2, 3, 4])
        assert 7 in t
        vectors, found = t.get(7)
        assert found.tolist() == [True] and vectors.tolist() == [[1, 2, 3, 4]]

    def test_extreme_int_keys(self, make_table: TableFactory) -> None:
        t = make_table(dim=16)
        keys = np.array([0, -1, 1, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1], dtype=np.int64)
        t.put(keys, encode(np.arange(len(keys)), 0))
        vectors, found = t.get(keys)
        assert found.all()
        assert vectors[:, 0].tolist() == list(range(len(keys)))
        assert sorted(t.keys().tolist()) == sorted(keys.tolist())
        # other integer dtypes and python ints address the same keys
        assert t.contains(np.array([0, 1], dtype=np.uint8)).all()
        assert t.contains([INT64_MAX, INT64_MIN]).all()
        assert not t.contains([2, -2, INT64_MAX - 2]).any()

    def test_get_default_fill(self, make_table: TableFactory) -> None:
        t = make_table(dim=3)
        t.put([1], [[1, 2, 3]])
        vectors, found = t.get([0, 1, 2])
        assert vectors.tolist() == [[0, 0, 0], [1, 2, 3], [0, 0, 0]] and found.tolist() == [False, True, False]
        vectors, _ = t.get([0, 1], default=-1.5)
        assert vectors.tolist() == [[-1.5, -1.5, -1.5], [1, 2, 3]]
        vectors, _ = t.get([1, 5, 6], default=[7, 8, 9])
        assert vectors.tolist() == [[1, 2, 3], [7, 8, 9], [7, 8, 9]]
        nan = t.get([4], default=np.nan)[0]
        assert np.isnan(nan).all()

    def test_get_returns_independent_arrays(self, make_table: TableFactory) -> None:
        t = make_table(dim=2)
        t.put([1], [[1, 2]])
        first, _ = t.get([1])
        first[:] = 100
        second, _ = t.get([1])
        assert second.tolist() == [[1, 2]]
        t.put([1], [[3, 4]])
        assert second.tolist() == [[1, 2]]  # not a view of the row
        t.close()
        assert second.tolist() == [[1, 2]]  # still valid after close

    def test_get_accepts_other_key_containers(self, make_table: TableFactory) -> None:
        t = make_table(dim=2)
        t.put(np.arange(10), np.ones((10, 2)))
        for keys in ([1, 2], (1, 2), np.array([1, 2], dtype=np.int32), np.arange(10)[1:3], np.arange(20)[2:6:2],
                     (k for k in (1, 2))):
            assert t.get(keys)[1].all()
        strided = np.arange(20, dtype=np.int64)[::3]  # non-contiguous int64
        assert t.get(strided)[1].tolist() == [k < 10 for k in strided]

    def test_delete_len_contains(self, make_table: TableFactory) -> None:
        t = make_table(dim=2)
        t.put(np.arange(10), np.ones((10, 2)))
        assert t.delete([3, 3, 4, 100]) == 2
        assert t.delete([3]) == 0
        assert len(t) == 8
        assert 3 not in t and 5 in t
        assert t.contains([2, 3, 4, 5]).tolist() == [True, False, False, True]
        vectors, found = t.get([3, 5])
        assert found.tolist() == [False, True] and vectors[0].tolist() == [0, 0]
        assert sorted(t.keys().tolist()) == [0, 1, 2, 5, 6, 7, 8, 9]
        assert sorted(t) == [0, 1, 2, 5, 6, 7, 8, 9]
        self.check_invariants(t)

    def test_contains_wrong_key_type_is_false(self, make_table: TableFactory) -> None:
        ints = make_table(dim=2)
        ints.put([1], [[1, 1]])
        strs = make_table(dim=2, key_type="str")
        strs.put(["1"], [[1, 1]])
        assert 1 in ints and "1" not in ints and 1.5 not in ints and None not in ints
        assert "1" in strs and b"1" in strs and 1 not in strs and None not in strs

    def test_duplicate_keys_last_wins_int(self, make_table: TableFactory) -> None:
        t = make_table(dim=16)
        keys = np.array([1, 2, 1, 3, 1, 2])
        t.put(keys, encode(keys, np.arange(len(keys))))
        assert len(t) == 3
        assert check_vectors([1, 2, 3], t.get([1, 2, 3])[0]).tolist() == [4, 5, 3]
        self.check_invariants(t)

    def test_duplicate_keys_last_wins_str(self, make_table: TableFactory) -> None:
        t = make_table(dim=1, key_type="str")
        t.put(["a", "b", "a", b"a"], [[1], [2], [3], [4]])
        assert len(t) == 2
        assert t.get(["a", "b"])[0].ravel().tolist() == [4, 2]
        self.check_invariants(t)

    def test_nan_inf_and_signed_zero_stored_as_given(self, make_table: TableFactory) -> None:
        t = make_table(dim=6)
        bits = np.array([0x7FC00000, 0x7FC00001, 0xFFC00123, 0x7F800000, 0xFF800000, 0x80000000], dtype=np.uint32)
        v = bits.view(np.float32).reshape(1, 6)  # quiet NaNs with payloads, +inf, -inf, -0.0
        t.put([1], v)
        got, _ = t.get([1])
        assert got.view(np.uint32).tolist() == [bits.tolist()]
        t64 = make_table(dim=3, dtype="float64")
        t64.put([1], [[np.nan, np.inf, -0.0]])
        got = t64.get([1])[0][0]
        assert np.isnan(got[0]) and got[1] == np.inf and got[2] == 0 and np.signbit(got[2])

    def test_float16_overflow_becomes_inf(self, make_table: TableFactory) -> None:
        t = make_table(dim=3, dtype="float16")
        with np.errstate(over="ignore"):
            t.put([1], np.array([[1e6, -1e6, np.nan]]))
        got = t.get([1])[0][0]
        assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2])

    def test_empty_batches(self, make_table: TableFactory) -> None:
        t = make_table(dim=3)
        t.put([1], [[1, 2, 3]])
        before = self.state(t)
        vectors, found = t.get([])
        assert vectors.shape == (0, 3) and found.shape == (0,) and found.dtype == np.bool_
        vectors, found = t.get(np.array([], dtype=np.int64))
        assert vectors.shape == (0, 3)
        t.put([], np.empty((0, 3)))
        t.put(np.array([], dtype=np.int64), np.empty((0, 3), dtype=np.float32))
        assert t.delete([]) == 0
        assert t.contains([]).shape == (0,)
        assert len(t) == 1 and self.state(t) == before
        s = make_table(dim=3, key_type="str")
        vectors, found = s.get([])
        assert vectors.shape == (0, 3) and found.shape == (0,)
        s.put([], np.empty((0, 3)))
        assert s.delete([]) == 0 and len(s) == 0

    def test_one_batch_larger_than_a_small_table(self, make_table: TableFactory) -> None:
        t = make_table(dim=4)
        t.put(np.arange(5000), np.ones((5000, 4)))
        assert len(t) == 5000 and t.get(np.arange(5000))[1].all()
        self.check_invariants(t)

    # ---------------------------------------------------------------- string keys

    def test_str_keys_are_exact(self, make_table: TableFactory) -> None:
        t = make_table(dim=16, key_type="str")
        keys = TRICKY_KEYS + BYTES_KEYS
        assert len(set(keys)) == len(keys)
        t.put(keys, encode(np.arange(len(keys)), 1))
        assert len(t) == len(keys)
        vectors, found = t.get(keys)
        assert found.all()
        assert check_vectors(np.arange(len(keys)), vectors).tolist() == [1] * len(keys)
        for i, k in enumerate(keys):  # one key at a time, as bare str / bytes
            v, f = t.get(k)
            assert f.tolist() == [True] and v[0, 0] == i
        misses = ["b", "a\x00\x00\x00", "\x00\x00", "ab\x00", "abc\x00", "x" * 4998, "x" * 5001, "🔑🔑🔑",
                  "ключи", b"\xff\x00\x00", b"\xfe", "Abc", "ABC"]
        assert not t.contains(misses).any()
        assert sorted(map(repr, t.keys())) == sorted(map(repr, keys))
        self.check_invariants(t)

    def test_str_and_utf8_bytes_are_the_same_key(self, make_table: TableFactory) -> None:
        t = make_table(dim=1, key_type="str")
        t.put(["ключ"], [[1]])
        assert t.get(["ключ".encode()])[1].all()
        t.put([b"plain"], [[2]])
        assert t.get("plain")[0].tolist() == [[2]]
        assert sorted(t.keys()) == ["plain", "ключ"]  # UTF-8 keys come back as str
        assert t.delete([b"\xd0\xba\xd0\xbb\xd1\x8e\xd1\x87"]) == 1

    def test_str_keys_sharing_prefixes_delete_exactly(self, make_table: TableFactory) -> None:
        t = make_table(dim=1, key_type="str")
        keys = ["k", "k\x00", "k\x00\x00", "kk", "kkk"]
        t.put(keys, np.arange(5).reshape(5, 1))
        assert t.delete(["k\x00"]) == 1
        vectors, found = t.get(keys)
        assert found.tolist() == [True, False, True, True, True]
        assert vectors[found].ravel().tolist() == [0, 2, 3, 4]

    def test_str_keys_from_numpy_arrays(self, make_table: TableFactory) -> None:
        t = make_table(dim=1, key_type="str")
        t.put(np.array(["a", "bb", "ccc"]), [[1], [2], [3]])
        assert t.get(np.array(["ccc", "a", "zz"]))[1].tolist() == [True, True, False]
        assert t.get(np.array(["bb"], dtype=object))[0].tolist() == [[2]]

    # ---------------------------------------------------------------- export

    @pytest.mark.parametrize("key_type", ["int64", "str"])
    def test_export_and_keys_roundtrip(self, make_table: TableFactory, key_type: Literal["int64", "str"]) -> None:
        t = make_table(dim=16, dtype="float64", key_type=key_type)
        ids = np.random.default_rng(12345).choice(10**12, size=500, replace=False).astype(np.int64)
        keys: Any = ids if key_type == "int64" else [f"id:{i}" for i in ids.tolist()]
        t.put(keys, encode(ids, 9))
        t.delete(keys[:50])
        ekeys, evecs = t.export()
        assert evecs.dtype == np.float64 and len(ekeys) == 450
        assert sorted(map(repr, ekeys)) == sorted(map(repr, keys[50:])) == sorted(map(repr, t.keys()))
        by_key = dict(zip(list(keys), ids.tolist(), strict=True))
        check_vectors([by_key[k] for k in ekeys], evecs)
        if key_type == "int64":
            assert ekeys.dtype == np.int64

    def test_export_of_empty_table(self, make_table: TableFactory) -> None:
        t = make_table(dim=3)
        keys, vectors = t.export()
        assert isinstance(keys, np.ndarray) and keys.shape == (0,) and vectors.shape == (0, 3)
        s = make_table(dim=3, key_type="str")
        keys, vectors = s.export()
        assert list(keys) == [] and vectors.shape == (0, 3)

    @pytest.mark.parametrize("key_type", ["int64", "str"])
    def test_random_operations_match_a_dict(self, make_table: TableFactory,
                                            key_type: Literal["int64", "str"]) -> None:
        """Seeded random batches of put/delete/get on a small table, checked against a dict.

        Now and then the whole content is replaced in one step, where the kind can
        (:meth:`replace_all`, a bulk load).
        """
        rng = np.random.default_rng(2024)
        t = make_table(dim=3, key_type=key_type)
        model: dict[Any, list[float]] = {}

        def make_keys(n: int) -> list[Any]:
            ids: list[int] = rng.integers(0, 300, size=n).tolist()
            return list(ids) if key_type == "int64" else [f"k{i}" + "\x00" * (i % 3) for i in ids]

        for step in range(300):
            op = rng.choice(["put", "put", "delete", "get", "load"], p=[0.4, 0.2, 0.2, 0.18, 0.02])
            keys = make_keys(int(rng.integers(0, 40)))
            if op == "put":
                vecs = rng.integers(-1000, 1000, size=(len(keys), 3)).astype(np.float32)
                t.put(keys, vecs)
                for k, v in zip(keys, vecs, strict=True):
                    model[k] = v.tolist()
            elif op == "delete":
                assert t.delete(keys) == len(set(keys) & model.keys())
                for k in keys:
                    model.pop(k, None)
            elif op == "load":
                vecs = rng.integers(-1000, 1000, size=(len(keys), 3)).astype(np.float32)
                if keys and self.replace_all(t, keys, vecs):
                    model = {k: v.tolist() for k, v in zip(keys, vecs, strict=True)}
            vectors, found = t.get(keys) if keys else (np.empty((0, 3)), np.empty(0, bool))
            assert found.tolist() == [k in model for k in keys], f"step {step} ({op})"
            assert [v for v, f in zip(vectors.tolist(), found, strict=True) if f] == [model[k] for k in keys
                                                                                     if k in model]
            assert len(t) == len(model)
        exported_keys, exported = t.export()
        assert {k: v.tolist() for k, v in zip(list(exported_keys), exported, strict=True)} == model
        self.check_invariants(t)

    # ---------------------------------------------------------------- tags and freshness

    def tagged_table(self, make_table: TableFactory, **kwargs: Any) -> EmbeddingTable:
        """A table that keeps tags if this kind can: ``tagged=True`` goes to factories that take it
        (a factory written before the suite asked for it makes an untagged table, and the tag
        tests then skip)."""
        try:
            params = inspect.signature(make_table).parameters.values()
            takes = any(p.name == "tagged" or p.kind is p.VAR_KEYWORD for p in params)
        except (TypeError, ValueError):
            takes = True
        return make_table(**kwargs, tagged=True) if takes else make_table(**kwargs)

    def _needs_tags(self, t: EmbeddingTable) -> None:
        if not t.capabilities.tagged:
            pytest.skip("this kind of table keeps no row tags")

    @pytest.mark.parametrize("key_type", ["int64", "str"])
    def test_row_tags_roundtrip_and_follow_every_rewrite(self, make_table: TableFactory,
                                                         key_type: Literal["int64", "str"]) -> None:
        t = self.tagged_table(make_table, dim=4, key_type=key_type)
        self._needs_tags(t)
        keys: list[Any] = [5, 6, 7] if key_type == "int64" else ["a", "b" * 40, "c"]
        t.put(keys, encode([1, 2, 3], 1, 4), tags=[1, 2**64 - 1, 0])
        vectors, found, tags = t.get_tagged([*keys, keys[0] * 2])
        assert found.tolist() == [True, True, True, False]
        assert tags.dtype == np.uint64 and tags.tolist() == [1, 2**64 - 1, 0, 0]
        assert (check_vectors([1, 2, 3], vectors[:3]) == 1).all()
        t.put(keys[:2], encode([1, 2], 2, 4))  # a put without tags resets them
        assert t.get_tagged(keys)[2].tolist() == [0, 0, 0]
        t.put(keys, encode([1, 2, 3], 3, 4), tags=9)  # one tag for the batch
        assert t.get_tagged(keys)[2].tolist() == [9, 9, 9]
        more: list[Any] = [100 + i for i in range(40)] if key_type == "int64" else [f"k{i}" for i in range(40)]
        t.put(more, encode(np.arange(40), 1, 4), tags=np.arange(40, dtype=np.uint64) + 1000)
        assert t.get_tagged(keys)[2].tolist() == [9, 9, 9], "more rows lost the tags"
        assert t.get_tagged(more)[2].tolist() == list(range(1000, 1040))

    def test_get_fresh_classifies_by_version_and_age(self, make_table: TableFactory) -> None:
        t = self.tagged_table(make_table, dim=2)
        self._needs_tags(t)
        now = time.time()
        t.put([1, 2, 3, 4], np.ones((4, 2)), tags=[make_tag(1, now), make_tag(2, now - 1000), make_tag(2, now), 0])
        stats = np.zeros(4, dtype=np.int64)
        vectors, status, fresh = t.get_fresh([1, 2, 3, 4, 5], min_version=2, max_age=100, default=7.0, stats=stats)
        assert status.dtype == np.int8
        assert status.tolist() == [STALE, STALE, HIT, HIT, OOV]
        assert fresh == 2 and stats.tolist() == [1, 5, 2, 2]  # calls, keys, fresh, stale
        assert vectors[:4].tolist() == [[1, 1]] * 4 and vectors[4].tolist() == [7, 7]
        vectors, status, fresh = t.get_fresh([1, 2, 3], min_version=2, max_age=100, default=7.0, stats=stats,
                                             stale_as_miss=True)
        assert status.tolist() == [OOV, OOV, HIT] and fresh == 1
        assert vectors.tolist() == [[7, 7], [7, 7], [1, 1]]
        assert stats.tolist() == [2, 8, 3, 2]
        assert t.get_fresh([1, 2], min_version=1)[1].tolist() == [HIT, HIT]  # no age limit
        assert t.get_fresh([], min_version=1)[2] == 0
        with pytest.raises(ValueError):
            t.get_fresh([1], min_version=1, stats=np.zeros(3, dtype=np.int64))
        with pytest.raises(SchemaError):
            t.get_fresh([1], min_version=-1)

    # ---------------------------------------------------------------- bad input

    @pytest.mark.parametrize("case", list(BAD_INT_WRITES))
    def test_bad_write_to_int_table_changes_nothing(self, make_table: TableFactory, case: str) -> None:
        t = make_table(dim=4)
        t.put(np.arange(20), np.arange(80).reshape(20, 4))
        call, exc = BAD_INT_WRITES[case]
        before = self.state(t)
        with pytest.raises(exc):
            call(t)
        assert self.state(t) == before

    @pytest.mark.parametrize("case", list(BAD_TAG_WRITES))
    def test_bad_tags_change_nothing(self, make_table: TableFactory, case: str) -> None:
        t = self.tagged_table(make_table, dim=4)
        self._needs_tags(t)
        t.put(np.arange(20), np.arange(80).reshape(20, 4), tags=7)
        call, exc = BAD_TAG_WRITES[case]
        before = self.state(t)
        with pytest.raises(exc, match="tags"):
            call(t)
        assert self.state(t) == before

    def test_untagged_table_reads_tags_as_zero_and_refuses_them(self, make_table: TableFactory) -> None:
        t = make_table(dim=4)
        if t.capabilities.tagged:
            pytest.skip("this kind keeps a tag in every row")
        t.put([1, 2], np.ones((2, 4)))
        _, found, tags = t.get_tagged([1, 2, 3])
        assert found.tolist() == [True, True, False] and tags.tolist() == [0, 0, 0]
        assert t.get_fresh([1, 3], min_version=5)[1].tolist() == [HIT, OOV]  # untagged rows are fresh
        before = self.state(t)
        with pytest.raises(SchemaError, match="tags"):
            t.put([1], np.zeros((1, 4)), tags=[9])
        assert self.state(t) == before

    @pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
    def test_quantized_rows_read_back_within_their_error_bound(self, make_table: TableFactory, dtype: str) -> None:
        if dtype not in self.quantized_dtypes:
            pytest.skip(f"this kind does not store {dtype}")
        t = make_table(dim=33, dtype=dtype)
        assert t.dtype == np.float32  # reads return float32
        x = np.random.default_rng(7).standard_normal((300, 33)).astype(np.float32) * np.float32(3)
        x[0] = 0  # an all-zero row: scale 0
        x[1, :] = 1e-30  # tiny values
        t.put(np.arange(300), x)
        got, found = t.get(np.arange(301))
        assert found.tolist() == [True] * 300 + [False] and got.dtype == np.float32
        # int8: half a step of the row's scale; bfloat16 keeps 8 significant bits (at most 2**-9 off)
        bound = np.abs(x).max(axis=1, keepdims=True) / 127 / 2 if dtype == "int8" else np.abs(x) * 2.0**-8
        assert (np.abs(got[:300] - x) <= bound * (1 + 1e-6) + 1e-37).all()
        assert not got[0].any()
        keys, exported = t.export()
        np.testing.assert_array_equal(exported[np.argsort(keys)], got[:300])  # export reads what get reads

    @pytest.mark.parametrize("case", list(BAD_STR_WRITES))
    def test_bad_write_to_str_table_changes_nothing(self, make_table: TableFactory, case: str) -> None:
        t = make_table(dim=4, key_type="str")
        t.put([f"k{i}" for i in range(20)], np.arange(80).reshape(20, 4))
        call, exc = BAD_STR_WRITES[case]
        before = self.state(t)
        with pytest.raises(exc):
            call(t)
        assert self.state(t) == before

    def test_bad_reads_raise_typed_errors(self, make_table: TableFactory) -> None:
        ints = make_table(dim=4)
        ints.put(np.arange(20), np.arange(80).reshape(20, 4))
        strs = make_table(dim=4, key_type="str")
        strs.put([f"k{i}" for i in range(20)], np.arange(80).reshape(20, 4))
        bad_reads: list[tuple[EmbeddingTable, Any]] = [
            (ints, ["1"]), (ints, [1.5]), (ints, np.zeros((2, 2), dtype=np.int64)),
            (strs, [1]), (strs, np.array([1, 2])), (strs, ["a", None]),
        ]
        for table, keys in bad_reads:
            for read in (table.get, table.contains, table.get_tagged):
                with pytest.raises(KeyTypeError):
                    read(keys)
        for t, key in ((ints, 1), (strs, "k1")):
            with pytest.raises(SchemaError):
                t.get([key], default=[1, 2])
            with pytest.raises(SchemaError):
                t.get([key], default="x")
            assert t.get([key])[1].all()

    def test_closed_table_refuses_calls(self, make_table: TableFactory) -> None:
        t = make_table(dim=4)
        t.put([1], ONES)
        kept, _ = t.get([1])
        t.close()
        calls: list[Callable[[], object]] = [
            lambda: t.get([1]), lambda: t.put([2], ONES), lambda: t.delete([1]), lambda: len(t),
            lambda: t.keys(), lambda: t.contains([1]), lambda: t.export(), lambda: t.info()]
        for call in calls:
            with pytest.raises(TableClosedError):
                call()
        t.close()  # closing twice is fine
        assert kept.tolist() == [[1, 1, 1, 1]]

    # ---------------------------------------------------------------- other processes

    def test_reader_in_another_process_sees_writes(self, make_table: TableFactory) -> None:
        t = make_table(dim=16)
        opener = self.reader_opener(t)
        if opener is None or not t.capabilities.shared_across_processes:
            pytest.skip("this kind of table cannot be opened by another process")
        first = np.arange(100)
        t.put(first, encode(first, 1))
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded test process
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve_reads, args=(opener, child), daemon=True)
        proc.start()
        child.close()
        try:
            assert parent.poll(60), "the reader process did not start"
            ready = parent.recv()
            assert ready[0] == "ready", ready
            assert ready[1:] == ("ReadOnlyError", False), "a read-only reader accepted a write"
            for version, keys in enumerate((first, np.arange(5000), np.arange(5000)), start=1):
                if version > 1:
                    t.put(keys, encode(keys, version))  # many more rows: the table may republish
                    t.delete(keys[:10])
                parent.send(keys)
                assert parent.poll(60), "the reader process did not answer"
                vectors, found, rows = parent.recv()
                want = np.ones(len(keys), dtype=bool)
                if version > 1:
                    want[:10] = False
                assert found.tolist() == want.tolist(), f"version {version}"
                assert (check_vectors(keys[want], vectors[want]) == version).all()
                assert rows == len(t)
            parent.send(None)
            proc.join(30)
            assert proc.exitcode == 0
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
            parent.close()

    def test_many_tables_from_one_factory_are_independent(self, make_table: TableFactory) -> None:
        tables = [make_table(dim=4) for _ in range(3)]
        for i, t in enumerate(tables):
            t.put([1, i + 10], np.full((2, 4), i))
        for i, t in enumerate(tables):
            assert len(t) == 2 and t.get([1])[0].tolist() == [[i] * 4]
            assert t.contains([i + 10]).all() and not t.contains([j + 10 for j in range(3) if j != i]).any()
        assert len({t.name for t in tables}) == 3
