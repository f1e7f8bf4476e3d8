"""The on-disk (and in-/dev/shm) layout of one embkv table file.

One table version is one file. All integers are little-endian; every section starts on a
4096-byte boundary so it can be mapped and paged independently::

    [0, 4096)          header: immutable part (bytes 0..119, CRC-32 at 120)
                               mutable counters (bytes 128..191, one writer updates them)
    [index_offset)     hash index: slot_count x u64, linear probing from mulhi(hash, slot_count);
                       fingerprint (24 bits of the hash) << 40 | row field, where the row
                       field is 0 = empty, 2**40-1 = tombstone, otherwise row index + 1
    [rows_offset)      row area: row_capacity x row_stride bytes; each row is
                       int keys: seq u64 | key i64 | [tag u64] | vector
                       str keys: seq u64 | 24 key bytes | [tag u64] | vector, where the key
                                 bytes are the key zero padded (keys of up to 24 bytes), or
                                 its first 16 bytes and the u64 heap offset of the whole key
                       seq: row checksum (32 bits) | key code (8 bits: a string key's length,
                       or 255 for a key in the heap) | write count (24 bits, odd while written)
                       tag (tables made with tags=True, flag bit 0): a word the writer sets
                       with the vector (0 if none); compute on miss keeps model version << 32 |
                       fill time (unix seconds) there. vector: see codec.py
    [freelist_offset)  row_capacity x u64: stack of rows free for reuse
    [heap_offset)      str keys longer than 24 bytes: u64 length | key bytes, append-only

The file is sparse: the header and index are allocated when it is made, the other sections
as the writer reaches them (``Mapping.reserve``), so spare capacity costs address space,
not memory or disk.

ARCHITECTURE.md explains how the writer and readers use these fields.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from typing import Final, Literal

import numpy as np

from ..errors import (
    CorruptTableError,
    FormatVersionError,
    NotATableError,
    SchemaError,
    TruncatedTableError,
)
from .codec import QUANTIZED, stored_bytes

__all__ = [
    "COUNTERS_OFFSET",
    "DTYPES",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KEY_TYPES",
    "MAGIC",
    "Counter",
    "DTypeName",
    "KeyType",
    "Layout",
    "make_tag",
    "tag_time",
    "tag_version",
]

MAGIC: Final = b"EMBKVTB1"
# 4: 8-byte index slots (fingerprint | row), string keys of up to 24 bytes only in their row,
# sparse sections; 3 (unreleased): the tag word only in tables made with tags=True, int8 and
# bfloat16 rows; 2: every row carries a tag word (embkv 0.2); 1: embkv 0.1
FORMAT_VERSION: Final = 4
UPGRADABLE_VERSIONS: Final = (2, 3)  # `embkv upgrade` rewrites them (legacy.py reads them)
HEADER_SIZE: Final = 4096
PAGE: Final = 4096
COUNTERS_OFFSET: Final = 128
MAX_LOAD: Final = 0.75  # index slots in use (live + tombstones) before a rebuild
MAX_DIM: Final = 1 << 16
INLINE_KEY: Final = 24  # string keys up to this length live in their row only (no heap)
MAX_CAPACITY: Final = 1 << 39  # rows; the row field of a slot has 40 bits

DTypeName = Literal["float32", "float16", "float64", "int8", "bfloat16"]
KeyType = Literal["int64", "str"]
# dtype name -> code stored in the file; codes never change once released
DTYPES: Final[dict[DTypeName, int]] = {"float32": 1, "float16": 2, "float64": 3, "int8": 4, "bfloat16": 5}
KEY_TYPES: Final[dict[KeyType, int]] = {"int64": 1, "str": 2}
_DTYPE_NAMES: Final[dict[int, DTypeName]] = {v: k for k, v in DTYPES.items()}
_KEY_NAMES: Final[dict[int, KeyType]] = {v: k for k, v in KEY_TYPES.items()}

# immutable header fields, in file order, starting at byte 0 (version 2 lacked the last two)
_IMMUTABLE = struct.Struct("<8sIIIIII QQQQ QQQQ QQ II")
_CRC = struct.Struct("<I")
_CRC_OFFSET: Final = _IMMUTABLE.size  # 120
FLAG_TAGGED: Final = 1  # rows carry a u64 tag word at the end of the row header
_KNOWN_FLAGS: Final = FLAG_TAGGED


class Counter:
    """Indices of the mutable u64 counters at ``COUNTERS_OFFSET`` (mirrored in _kernels.c)."""

    GENERATION: Final = 0  # bumped by every write batch
    LIVE: Final = 1  # keys present
    ROWS_USED: Final = 2  # high-water mark of the row area
    FREE: Final = 3  # entries on the free-row stack
    HEAP_USED: Final = 4  # bytes of string keys written
    TOMBS: Final = 5  # deleted index slots not yet reclaimed
    SUPERSEDED: Final = 6  # 1 once a newer version replaced this file: readers reopen
    DIRTY: Final = 7  # pid of a writer inside a batch; non-zero on open means it died there
    COUNT: Final = 8


def _align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def slots_for(capacity: int) -> int:
    """Index slots for ``capacity`` rows: the load cap is reached when the rows run out."""
    return max(16, -(-capacity * 4 // 3))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything fixed about a table file: its schema and where each section lives."""

    dim: int
    dtype: DTypeName
    key_type: KeyType
    row_capacity: int
    slot_count: int
    heap_capacity: int
    row_header: int
    row_stride: int
    index_offset: int
    rows_offset: int
    freelist_offset: int
    heap_offset: int
    file_size: int
    created_ns: int = 0
    tagged: bool = False

    @property
    def out_dtype(self) -> np.dtype[np.floating]:
        """The dtype of the vectors a read returns (float32 for int8 and bfloat16 rows)."""
        return np.dtype(np.float32) if self.dtype in QUANTIZED else np.dtype(self.dtype)

    @property
    def vec_bytes(self) -> int:
        """Bytes of one stored vector (int8: its float32 scale, then the codes)."""
        return stored_bytes(self.dtype, self.dim)

    @property
    def out_bytes(self) -> int:
        """Bytes of one vector as a read returns it."""
        return self.dim * self.out_dtype.itemsize

    @classmethod
    def plan(cls, dim: int, dtype: str, key_type: str, capacity: int, heap_capacity: int = 0,
             created_ns: int = 0, *, tagged: bool = False) -> Layout:
        """Lay out a new file for ``capacity`` rows (``heap_capacity`` bytes of string keys)."""
        if not isinstance(dim, (int, np.integer)) or not 0 < int(dim) <= MAX_DIM:
            raise SchemaError(f"dim must be an int in 1..{MAX_DIM}, got {dim!r}")
        if dtype not in DTYPES:
            raise SchemaError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if key_type not in KEY_TYPES:
            raise SchemaError(f"key_type must be one of {sorted(KEY_TYPES)}, got {key_type!r}")
        capacity = max(16, int(capacity))
        if capacity > MAX_CAPACITY:
            raise SchemaError(f"capacity {capacity} exceeds the maximum {MAX_CAPACITY}")
        dim = int(dim)
        # int: seq | key; str: seq | key bytes (or a prefix and a heap offset); then the tag
        row_header = (16 if key_type == "int64" else 8 + INLINE_KEY) + (8 if tagged else 0)
        vec_bytes = stored_bytes(dtype, dim)
        row_stride = row_header + (vec_bytes + 7) // 8 * 8
        slot_count = slots_for(capacity)
        heap_capacity = 0 if key_type == "int64" else max(int(heap_capacity), 4096)
        index_offset = HEADER_SIZE
        rows_offset = _align(index_offset + slot_count * 8)
        freelist_offset = _align(rows_offset + capacity * row_stride)
        heap_offset = _align(freelist_offset + capacity * 8)
        file_size = _align(heap_offset + heap_capacity)
        return cls(dim, dtype, key_type, capacity, slot_count, heap_capacity, row_header, row_stride,
                   index_offset, rows_offset, freelist_offset, heap_offset, file_size, created_ns, bool(tagged))

    def pack_header(self) -> bytes:
        """The header page of a fresh file (counters all zero)."""
        fixed = _IMMUTABLE.pack(
            MAGIC, FORMAT_VERSION, HEADER_SIZE, self.dim, DTYPES[self.dtype], KEY_TYPES[self.key_type],
            self.row_header, self.row_stride, self.slot_count, self.row_capacity, self.heap_capacity,
            self.index_offset, self.rows_offset, self.freelist_offset, self.heap_offset, self.file_size,
            self.created_ns, FLAG_TAGGED if self.tagged else 0, 0,
        )
        page = bytearray(HEADER_SIZE)
        page[: len(fixed)] = fixed
        page[_CRC_OFFSET : _CRC_OFFSET + 4] = _CRC.pack(zlib.crc32(fixed))
        return bytes(page)

    @classmethod
    def parse(cls, head: bytes, actual_size: int, where: str = "table") -> Layout:
        """Validate a header read from a file of ``actual_size`` bytes; raise a typed error if bad."""
        if len(head) < 8 or head[:8] != MAGIC:
            if len(head) >= 5 and head[:5] == MAGIC[:5]:
                raise FormatVersionError(f"{where}: unknown embkv file variant {head[:8]!r}")
            raise NotATableError(f"{where}: not an embkv table file (magic {head[:8]!r})")
        if len(head) < 12:
            raise TruncatedTableError(f"{where}: file ends inside its header ({actual_size} bytes)")
        (version,) = struct.unpack_from("<I", head, 8)
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: written in format version {version}; this embkv reads up to {FORMAT_VERSION}. "
                "Upgrade embkv to open it."
            )
        if version in UPGRADABLE_VERSIONS:
            raise FormatVersionError(
                f"{where}: written in format version {version} (embkv 0.2); this embkv reads version "
                f"{FORMAT_VERSION}. Run `embkv upgrade STORE [TABLE]` to rewrite it (readers keep reading)."
            )
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: written in format version {version} (embkv 0.1); this embkv reads version "
                f"{FORMAT_VERSION}. Export it with the embkv that wrote it and load it again."
            )
        if len(head) < _CRC_OFFSET + 4:
            raise TruncatedTableError(f"{where}: file ends inside its header ({actual_size} bytes)")
        (_, version, header_size, dim, dtype_code, key_code, row_header, row_stride, slot_count,
         row_capacity, heap_capacity, index_offset, rows_offset, freelist_offset, heap_offset, file_size,
         created_ns, flags, reserved) = _IMMUTABLE.unpack_from(head)
        (stored_crc,) = _CRC.unpack_from(head, _CRC_OFFSET)
        if zlib.crc32(head[:_CRC_OFFSET]) != stored_crc:
            raise CorruptTableError(f"{where}: header checksum mismatch (the header is damaged)")
        if flags & ~_KNOWN_FLAGS or reserved:
            raise CorruptTableError(f"{where}: header fields out of range")
        if header_size != HEADER_SIZE or dtype_code not in _DTYPE_NAMES or key_code not in _KEY_NAMES:
            raise CorruptTableError(f"{where}: header fields out of range")
        try:
            expect = cls.plan(dim, _DTYPE_NAMES[dtype_code], _KEY_NAMES[key_code], row_capacity,
                              heap_capacity, created_ns, tagged=bool(flags & FLAG_TAGGED))
        except SchemaError as exc:
            raise CorruptTableError(f"{where}: header describes an impossible table ({exc})") from None
        got = (row_header, row_stride, slot_count, index_offset, rows_offset, freelist_offset, heap_offset,
               file_size, row_capacity)
        want = (expect.row_header, expect.row_stride, expect.slot_count, expect.index_offset,
                expect.rows_offset, expect.freelist_offset, expect.heap_offset, expect.file_size,
                expect.row_capacity)
        if got != want:
            raise CorruptTableError(f"{where}: header section offsets are inconsistent")
        if actual_size < file_size:
            raise TruncatedTableError(
                f"{where}: file has {actual_size} bytes but its header needs {file_size} (truncated)"
            )
        return expect


def check_counters(counters: np.ndarray, layout: Layout, where: str = "table") -> None:
    """Reject counter values no sane writer produces (they drive bounds in the kernels)."""
    cap = layout.row_capacity
    if (counters[Counter.ROWS_USED] > cap or counters[Counter.FREE] > cap
            or counters[Counter.LIVE] > cap or counters[Counter.HEAP_USED] > layout.heap_capacity
            or counters[Counter.LIVE] + counters[Counter.TOMBS] > layout.slot_count):
        raise CorruptTableError(f"{where}: header counters are out of range")


TAG_TIME_MASK: Final = 0xFFFFFFFF


def make_tag(version: int, filled_at: float) -> int:
    """The row tag compute on miss writes: ``version << 32 | whole unix seconds`` (0 means untagged)."""
    if not 0 < version < 1 << 31:
        raise SchemaError(f"model version must be in 1..{(1 << 31) - 1}, got {version!r}")
    return (int(version) << 32) | (int(filled_at) & TAG_TIME_MASK)


def tag_version(tag: int) -> int:
    """Model version kept in a row tag (0 for an untagged row)."""
    return int(tag) >> 32


def tag_time(tag: int) -> int:
    """Fill time (whole unix seconds) kept in a row tag (0 for an untagged row)."""
    return int(tag) & TAG_TIME_MASK
