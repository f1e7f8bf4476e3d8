"""Bad input and bad files get a typed error, and a failed call changes nothing.

Also runs under the numpy fallback kernel (see test_backends.py).
"""

from __future__ import annotations

import os
import resource
import struct
import zlib

import numpy as np
import pytest

import embkv
from embkv import errors
from embkv.file.format import FORMAT_VERSION, MAX_CAPACITY, MAX_DIM, Layout
from helpers import mapped_files

CRC_OFFSET = 120
ROW_FIELD = (1 << 40) - 1  # an index slot: 24-bit fingerprint << 40 | row + 1
COUNTERS = 128


def snapshot(t: embkv.Table) -> tuple:
    """Everything a failed call must leave as it was."""
    keys, vectors = t.export()
    content = sorted((repr(k), v.tobytes()) for k, v in zip(list(keys), vectors, strict=True))
    st = os.stat(t.path)
    folder = sorted(os.listdir(os.path.dirname(t.path)))
    return content, len(t), t.generation, t.capacity, (st.st_ino, st.st_size), folder


@pytest.fixture
def ints(store):
    t = store.create_table("ints", dim=4)
    t.put(np.arange(20), np.arange(80).reshape(20, 4))
    return t


@pytest.fixture
def strs(store):
    t = store.create_table("strs", dim=4, key_type="str")
    t.put([f"k{i}" for i in range(20)], np.arange(80).reshape(20, 4))
    return t


def test_errors_subclass_the_builtins():
    pairs = [
        (errors.TableNotFoundError, KeyError), (errors.TableExistsError, FileExistsError),
        (errors.SchemaError, ValueError), (errors.KeyTypeError, TypeError),
        (errors.ReadOnlyError, PermissionError), (errors.WriterLockedError, TimeoutError),
        (errors.TableClosedError, ValueError), (errors.NotATableError, ValueError),
        (errors.TruncatedTableError, ValueError), (errors.FormatVersionError, ValueError),
        (errors.CorruptTableError, ValueError), (errors.StoreNotFoundError, FileNotFoundError),
        (errors.ReadRetryError, RuntimeError),
    ]
    for cls, builtin in pairs:
        assert issubclass(cls, errors.EmbkvError) and issubclass(cls, builtin)
        assert getattr(embkv, cls.__name__) is cls
    assert str(errors.TableNotFoundError("no table 'x'")) == "no table 'x'"


# ------------------------------------------------------------------ bad writes change nothing

ONES = np.ones((1, 4), dtype=np.float32)

# ------------------------------------------------------------------ store-level misuse


def test_unknown_table(store):
    store.create_table("there", dim=1)
    with pytest.raises(errors.TableNotFoundError, match="nope") as info:
        store["nope"]
    assert isinstance(info.value, KeyError)
    with pytest.raises(errors.TableNotFoundError):
        store.drop_table("nope")
    with pytest.raises(errors.TableNotFoundError):
        embkv.open(store.path, readonly=True)["nope"]
    assert store.list_tables() == ["there"]


def test_readonly_store_missing_folder(store_path):
    with pytest.raises(errors.StoreNotFoundError):
        embkv.open(store_path, readonly=True)
    assert not os.path.exists(store_path)


def test_readonly_handle_refuses_every_write(store):
    t = store.create_table("t", dim=4)
    t.put([1], ONES)
    files = sorted(os.listdir(store.path))
    ro = embkv.open(store.path, readonly=True)
    rt = ro["t"]
    before = snapshot(t)
    calls = [
        lambda: rt.put([2], ONES), lambda: rt.delete([1]), lambda: ro.create_table("u", dim=4),
        lambda: ro.load_table("t", [5], ONES), lambda: ro.load_table("u", [5], ONES),
        lambda: ro.drop_table("t"),
    ]
    for call in calls:
        with pytest.raises(errors.ReadOnlyError):
            call()
    assert snapshot(t) == before
    assert rt.get([1])[1].all() and len(rt) == 1
    assert rt.export()[0].tolist() == [1]
    assert sorted(os.listdir(store.path)) == files


def test_readonly_store_creates_no_files(store):
    store.create_table("t", dim=4)
    ro = embkv.open(store.path, readonly=True)
    ro["t"].get([1])
    len(ro["t"])
    ro["t"].export()
    assert os.listdir(store.path) == ["t.ekv"]  # no lock file: readers never take the lock


def test_create_existing_table(store):
    t = store.create_table("t", dim=4)
    t.put([1], ONES)
    before = snapshot(t)
    with pytest.raises(errors.TableExistsError):
        store.create_table("t", dim=4)
    with pytest.raises(errors.TableExistsError):
        embkv.open(store.path).create_table("t", dim=8)
    with pytest.raises(errors.SchemaError):
        store.create_table("t", dim=8, exist_ok=True)
    with pytest.raises(errors.SchemaError):
        store.create_table("t", dim=4, dtype="float64", exist_ok=True)
    with pytest.raises(errors.SchemaError):
        store.create_table("t", dim=4, key_type="str", exist_ok=True)
    assert snapshot(t) == before


@pytest.mark.parametrize("kwargs", [
    {"dim": 0}, {"dim": -1}, {"dim": MAX_DIM + 1}, {"dim": 2.5}, {"dim": "4"},
    {"dim": 4, "dtype": "int16"}, {"dim": 4, "dtype": "bogus"}, {"dim": 4, "dtype": "complex64"},
    {"dim": 4, "key_type": "bytes"}, {"dim": 4, "key_type": "int32"},
    {"dim": 4, "capacity": MAX_CAPACITY + 1},
], ids=str)
def test_bad_table_spec(store, kwargs):
    with pytest.raises(errors.SchemaError):
        store.create_table("t", **kwargs)
    assert os.listdir(store.path) == []


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../x", "x.tmp", "x.lock", "a" * 129, "sp ace",
                                  "tab\t", "é", 5, None])
def test_bad_table_name(store, name):
    with pytest.raises(errors.SchemaError):
        store.create_table(name, dim=4)
    with pytest.raises(errors.SchemaError):
        store.load_table(name, [1], ONES)
    assert os.listdir(store.path) == []
    assert os.listdir(os.path.dirname(store.path)).count(os.path.basename(store.path)) == 1


def test_table_name_with_trailing_newline_is_rejected(store):
    with pytest.raises(errors.SchemaError):
        store.create_table("abc\n", dim=4)
    assert os.listdir(store.path) == []


def test_closed_table_and_store(store):
    t = store.create_table("t", dim=4)
    t.put([1], ONES)
    t.close()  # (calls on a closed table: the contract suite, test_conformance.py)
    assert store["t"].get([1])[1].all()  # the store opens it again
    store.close()
    for call in (lambda: store["t"], lambda: store.list_tables(), lambda: store.create_table("u", dim=1),
                 lambda: store.load_table("u", [1], ONES), lambda: store.drop_table("t")):
        with pytest.raises(errors.TableClosedError):
            call()
    assert embkv.open(store.path)["t"].get([1])[1].all()


# ------------------------------------------------------------------ bad load_table input


BAD_LOADS = {
    "length mismatch": (lambda s, n: s.load_table(n, [1, 2, 3], np.ones((2, 4))), errors.SchemaError),
    "1-d vectors": (lambda s, n: s.load_table(n, [1, 2], np.ones(8)), errors.SchemaError),
    "3-d vectors": (lambda s, n: s.load_table(n, [1], np.ones((1, 1, 4))), errors.SchemaError),
    "string vectors": (lambda s, n: s.load_table(n, [1], [["a", "b", "c", "d"]]), errors.SchemaError),
    "bool vectors": (lambda s, n: s.load_table(n, [1], np.ones((1, 4), bool)), errors.SchemaError),
    "bad dtype": (lambda s, n: s.load_table(n, [1], ONES, dtype="int16"), errors.SchemaError),
    "float keys": (lambda s, n: s.load_table(n, [1.5], ONES), errors.KeyTypeError),
    "float key array": (lambda s, n: s.load_table(n, np.array([1.0]), ONES), errors.KeyTypeError),
    "2-d keys": (lambda s, n: s.load_table(n, np.ones((1, 2), np.int64), ONES), errors.KeyTypeError),
    "mixed keys": (lambda s, n: s.load_table(n, [1, "a"], np.ones((2, 4))), errors.KeyTypeError),
    "bool keys": (lambda s, n: s.load_table(n, [True], ONES), errors.KeyTypeError),
    "not a source": (lambda s, n: s.load_table(n, 5), errors.SchemaError),
}
# these only clash with the schema of the existing table
BAD_LOADS_EXISTING = {
    "wrong dim": (lambda s, n: s.load_table(n, [1], np.ones((1, 5))), errors.SchemaError),
    "str keys for int table": (lambda s, n: s.load_table(n, ["a"], ONES), errors.SchemaError),
    "other dtype": (lambda s, n: s.load_table(n, [1], ONES, dtype="float64"), errors.SchemaError),
}


@pytest.mark.parametrize("case", list(BAD_LOADS) + list(BAD_LOADS_EXISTING))
def test_bad_load_changes_nothing(store, ints, case):
    call, exc = {**BAD_LOADS, **BAD_LOADS_EXISTING}[case]
    before = snapshot(ints)
    with pytest.raises(exc):
        call(store, "ints")
    assert snapshot(ints) == before
    if case in BAD_LOADS:  # the same data for a new table creates nothing
        with pytest.raises(exc):
            call(store, "fresh")
        assert store.list_tables() == ["ints"]
    assert sorted(os.listdir(store.path)) == ["ints.ekv", "ints.ekv.lock", "ints.ekv.wal"]


def test_bad_str_load_changes_nothing(store, strs):
    before = snapshot(strs)
    for name in ("strs", "fresh"):
        with pytest.raises(errors.KeyTypeError):
            store.load_table(name, ["a", 1], np.ones((2, 4)))
        with pytest.raises(errors.KeyTypeError):
            store.load_table(name, ["a", None], np.ones((2, 4)))
    with pytest.raises(errors.SchemaError):
        store.load_table("strs", [1, 2], np.ones((2, 4)))
    assert snapshot(strs) == before
    assert store.list_tables() == ["strs"]


def test_bad_arrow_sources_change_nothing(store, ints, store_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    before = snapshot(ints)
    good = pa.table({"key": [1, 2], "vector": [[1.0] * 4, [2.0] * 4]})
    with pytest.raises(errors.SchemaError, match="nope"):
        store.load_table("ints", good, key_column="nope")
    with pytest.raises(errors.SchemaError):
        store.load_table("ints", pa.table({"key": [1, 2], "vector": [[1.0] * 4, [2.0] * 3]}))
    with pytest.raises(errors.SchemaError):
        store.load_table("ints", pa.table({"key": [1, 2], "vector": [[1.0] * 4, None]}))
    with pytest.raises(errors.SchemaError):
        store.load_table("ints", pa.table({"key": [1, 2], "vector": [1.0, 2.0]}))
    with pytest.raises(errors.KeyTypeError):
        store.load_table("ints", pa.table({"key": [1.5, 2.5], "vector": [[1.0] * 4, [2.0] * 4]}))
    bad_path = os.path.join(store_path, "bad.parquet")
    pq.write_table(pa.table({"key": [1], "vec": [[1.0] * 4]}), bad_path)
    with pytest.raises(errors.SchemaError):
        store.load_table("ints", bad_path)
    os.unlink(bad_path)
    assert snapshot(ints) == before


# ------------------------------------------------------------------ damaged and foreign files


def _make_table(path: str, key_type: str = "int64") -> str:
    with embkv.open(path) as s:
        t = s.create_table("t", dim=4, key_type=key_type)
        keys = list(range(10)) if key_type == "int64" else [f"k{i}" for i in range(10)]
        t.put(keys, np.arange(40).reshape(10, 4))
        return t.path


def _patch(path: str, offset: int, data: bytes, fix_crc: bool) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        if fix_crc:
            f.seek(0)
            head = f.read(CRC_OFFSET)
            f.seek(CRC_OFFSET)
            f.write(struct.pack("<I", zlib.crc32(head)))


def _open_fails(store_path: str, exc: type[Exception] | tuple[type[Exception], ...]) -> None:
    for readonly in (False, True):
        s = embkv.open(store_path, readonly=readonly)
        with pytest.raises(exc):
            s["t"]
        assert mapped_files(store_path) == []
        s.close()


def test_foreign_file_is_not_a_table(store):
    store.create_table("good", dim=2).put([1], [[1, 2]])
    with open(os.path.join(store.path, "x.ekv"), "wb") as f:
        f.write(b"PK\x03\x04 this is a zip file, not a table" * 200)
    with pytest.raises(errors.NotATableError):
        store["x"]
    with pytest.raises(errors.NotATableError):
        embkv.open(store.path, readonly=True)["x"]
    assert store["good"].get([1])[0].tolist() == [[1, 2]]  # the other tables still work
    with open(os.path.join(store.path, "empty.ekv"), "wb"):
        pass
    with pytest.raises((errors.NotATableError, errors.TruncatedTableError)):
        store["empty"]


def test_unknown_variant_magic(store_path):
    path = _make_table(store_path)
    _patch(path, 0, b"EMBKVTB9", fix_crc=True)
    _open_fails(store_path, errors.FormatVersionError)


@pytest.mark.parametrize("size", [100, 4096, "half", "minus one"])
def test_truncated_file(store_path, size):
    path = _make_table(store_path)
    full = os.path.getsize(path)
    new = {"half": full // 2, "minus one": full - 1}.get(size, size)
    os.truncate(path, new)
    _open_fails(store_path, errors.TruncatedTableError)


@pytest.mark.parametrize("offset", [12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 111,
                                    CRC_OFFSET, CRC_OFFSET + 3])
@pytest.mark.parametrize("key_type", ["int64", "str"])
def test_flipped_header_byte_is_corrupt(store_path, offset, key_type):
    path = _make_table(store_path, key_type)
    with open(path, "rb") as f:
        f.seek(offset)
        byte = f.read(1)[0]
    _patch(path, offset, bytes([byte ^ 0x10]), fix_crc=False)
    _open_fails(store_path, errors.CorruptTableError)


def test_flipped_magic_or_version_byte(store_path):
    path = _make_table(store_path)
    _patch(path, 2, b"X", fix_crc=False)
    _open_fails(store_path, errors.NotATableError)
    _patch(path, 2, b"B", fix_crc=False)
    assert len(embkv.open(store_path)["t"]) == 10
    # the version is checked before the checksum (so a newer format is reported as such even if
    # it protects its header differently): a damaged version field may read as either error
    _patch(path, 9, b"\x10", fix_crc=False)
    _open_fails(store_path, (errors.FormatVersionError, errors.CorruptTableError))


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 2**32 - 1])
def test_newer_format_version(store_path, version):
    path = _make_table(store_path)
    _patch(path, 8, struct.pack("<I", version), fix_crc=True)
    _open_fails(store_path, errors.FormatVersionError)
    with pytest.raises(errors.FormatVersionError, match="Upgrade"):
        embkv.open(store_path)["t"]


@pytest.mark.parametrize(("version", "way_out"), [(1, r"embkv 0\.1.*load it again"),
                                                  (2, r"embkv 0\.2.*embkv upgrade STORE"),
                                                  (3, r"embkv 0\.2.*embkv upgrade STORE")])
def test_older_format_version_is_refused_with_a_way_out(store_path, version, way_out):
    path = _make_table(store_path)
    _patch(path, 8, struct.pack("<I", version), fix_crc=True)
    _open_fails(store_path, errors.FormatVersionError)
    with pytest.raises(errors.FormatVersionError, match=way_out):
        embkv.open(store_path)["t"]


def test_header_field_changes_with_valid_crc_are_caught(store_path):
    path = _make_table(store_path)
    with open(path, "rb") as f:
        original = f.read(CRC_OFFSET)
    bad_fields = [
        (12, struct.pack("<I", 8192)),  # header size
        (16, struct.pack("<I", 5)),  # dim: sections no longer add up
        (16, struct.pack("<I", 0)),  # dim 0
        (20, struct.pack("<I", 9)),  # dtype code
        (24, struct.pack("<I", 3)),  # key type code
        (48, struct.pack("<Q", 2**39)),  # capacity
        (72, struct.pack("<Q", 4096)),  # rows offset overlapping the index
        (96, struct.pack("<Q", 10**15)),  # file size
    ]
    for offset, data in bad_fields:
        _patch(path, 0, original, fix_crc=True)
        _patch(path, offset, data, fix_crc=True)
        _open_fails(store_path, errors.CorruptTableError)
    _patch(path, 0, original, fix_crc=True)
    assert embkv.open(store_path)["t"].get([3])[0].tolist() == [[12, 13, 14, 15]]


@pytest.mark.parametrize("capacity", [2**36, MAX_CAPACITY, MAX_CAPACITY + 1, 2**63])
def test_huge_claimed_capacity_fails_without_allocating(store_path, capacity):
    path = _make_table(store_path)
    size = os.path.getsize(path)
    if capacity <= MAX_CAPACITY:
        # a self-consistent header (every offset recomputed) for a huge table: only the
        # file size gives it away
        head = Layout.plan(4, "float32", "int64", capacity).pack_header()[:CRC_OFFSET + 4]
        expect: type[Exception] = errors.TruncatedTableError
    else:
        head = b""
        expect = errors.CorruptTableError
    if head:
        _patch(path, 0, head, fix_crc=False)
    else:
        _patch(path, 48, struct.pack("<Q", capacity), fix_crc=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _open_fails(store_path, expect)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss_after - rss_before < 64 * 1024  # KiB
    assert os.path.getsize(path) == size  # nothing was extended or allocated on disk either


def test_counters_out_of_range_are_corrupt(store_path):
    path = _make_table(store_path)
    with open(path, "rb") as f:
        original = f.read(4096)
    for counter, value in [(1, 10**9), (2, 10**9), (3, 10**9), (1, 2**64 - 1)]:
        _patch(path, COUNTERS + 8 * counter, struct.pack("<Q", value), fix_crc=False)
        _open_fails(store_path, errors.CorruptTableError)
        _patch(path, 0, original, fix_crc=False)
    assert len(embkv.open(store_path)["t"]) == 10


@pytest.mark.parametrize("key_type", ["int64", "str"])
def test_index_pointing_outside_rows_is_corrupt(store_path, key_type):
    path = _make_table(store_path, key_type)
    with open(path, "rb") as f:
        lay = Layout.parse(f.read(4096), os.path.getsize(path))
    raw = np.fromfile(path, dtype=np.uint64)
    slots = raw[lay.index_offset // 8 : lay.index_offset // 8 + lay.slot_count]
    field = slots & np.uint64(ROW_FIELD)
    used = np.flatnonzero((field != 0) & (field != np.uint64(ROW_FIELD)))
    assert len(used) == 10
    victim_slot = used[0]
    victim_row = int(field[victim_slot]) - 1
    # which key the slot belongs to: read it back from the row
    row_start = (lay.rows_offset + victim_row * lay.row_stride) // 4 + lay.row_header // 4
    first = np.fromfile(path, dtype=np.float32)[row_start]
    key = int(first) // 4 if key_type == "int64" else f"k{int(first) // 4}"
    fingerprint = int(slots[victim_slot]) & ~ROW_FIELD  # keep it: the probe must still pick this slot
    _patch(path, lay.index_offset + 8 * int(victim_slot), struct.pack("<Q", fingerprint | (lay.row_capacity + 7)),
           fix_crc=False)
    s = embkv.open(store_path)
    t = s["t"]
    with pytest.raises(errors.CorruptTableError):
        t.get([key])
    with pytest.raises(errors.CorruptTableError):
        t.put([key], ONES)
    with pytest.raises(errors.CorruptTableError):
        t.export()
    others = [k for k in (range(10) if key_type == "int64" else [f"k{i}" for i in range(10)]) if k != key]
    assert t.get(others)[1].all()


# ------------------------------------------------------------------ stale handles


def test_old_handle_after_drop_and_recreate_with_other_dim(store):
    store.create_table("t", dim=4).put([1], ONES)
    old = embkv.open(store.path, readonly=True)["t"]
    assert old.get([1])[1].all()
    store.drop_table("t")
    store.create_table("t", dim=8).put([1], np.full((1, 8), 3.0))
    try:
        vectors, found = old.get([1])
    except embkv.EmbkvError:
        return  # a typed error is an acceptable answer
    assert found.all() and vectors.tolist() == [[3.0] * 8]


def test_store_close_closes_every_table_even_when_one_file_was_replaced(disk_store_path):
    store = embkv.open(disk_store_path)
    a, b = store.create_table("a", dim=4), store.create_table("b", dim=4)
    a.put([1, 2], np.ones((2, 4)))
    b.put([1, 2], np.ones((2, 4)))  # both logs hold a record: close checkpoints them
    junk = os.path.join(disk_store_path, "junk")
    with open(junk, "wb") as f:
        f.write(b"x" * 8192)
    os.rename(junk, os.path.join(disk_store_path, "a.ekv"))  # a foreign file where table a was
    store.close()  # the failed checkpoint of a does not stop the rest
    assert a.closed and b.closed
    assert mapped_files(disk_store_path) == []


def test_generator_keys_survive_the_retry_after_a_schema_change(store):
    t = store.create_table("t", dim=4)
    t.put([1, 2], np.ones((2, 4)))
    other = embkv.open(store.path)
    other.drop_table("t")
    other.create_table("t", dim=8).put([1, 2], np.ones((2, 8)))
    vectors, found = t.get(k for k in (1, 2))  # read once, then retried on the new schema
    assert vectors.shape == (2, 8) and found.tolist() == [True, True]
    other.close()


def test_a_write_session_ends_with_its_block(store):
    t = store.create_table("t", dim=4)
    with t.write_session() as session:
        assert session.mapping.layout.dim == 4
    with pytest.raises(errors.WriterLockedError, match="ended"):
        session.drop()  # outside the lock: refused
    assert "t" in store
