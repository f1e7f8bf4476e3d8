"""File-table behaviour in one process beyond the table contract: growth, reuse of rows, load, export, versions.

The contract every table keeps (put/get/delete, dtypes, key types, bad input) is the shipped
suite ``embkv.testing.BackendTests``, which test_conformance.py runs on file tables.

This file also runs under the numpy fallback kernel (see test_backends.py), so it keeps its
sizes small enough for the fallback's per-key Python write loop.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

import embkv
from helpers import check_vectors, encode, mapped_files

INT64_MIN = np.iinfo(np.int64).min
INT64_MAX = np.iinfo(np.int64).max


def as_dict(keys, vectors) -> dict:
    return {k: v.tobytes() for k, v in zip(list(keys), vectors, strict=True)}


def check_accounting(t: embkv.Table) -> None:
    """Row bookkeeping adds up: every used row is live or on the free stack."""
    info = t.info()
    assert info["rows"] == len(t) == len(t.keys())
    assert info["rows_used"] - info["free_rows"] == info["rows"], info
    assert info["rows_used"] <= info["capacity"]


# ------------------------------------------------------------------ basics


def test_backend_is_the_one_asked_for():
    want = "numpy" if os.environ.get("EMBKV_KERNEL", "").lower() == "numpy" else "c"
    assert want == embkv.KERNEL_BACKEND


# ------------------------------------------------------------------ string keys

TRICKY_KEYS = [
    "", "a", "a\x00", "a\x00\x00", "\x00", "\x00a", "ab", "abc", "abd", "abcd", "abc ", " abc",
    "A", "ключ", "键", "🔑", "🔑🔑", "é", "e\u0301",  # NFC and NFD spell the same letter: different keys
    "x" * 5000, "x" * 4999, "x" * 4999 + "y", "tab\tkey", "line\nkey",
]
BYTES_KEYS = [b"\xff", b"\xff\x00", b"\xfe\xff\x00\x01", b"\x80abc"]  # not UTF-8: come back as bytes


# ------------------------------------------------------------------ growth and reuse


def test_growth_past_capacity_keeps_every_row(store):
    t = store.create_table("t", dim=16, capacity=16)
    assert t.capacity == 16
    keys = np.random.default_rng(7).permutation(20_000).astype(np.int64) * 3 - 30_000
    bounds = [0, 1, 2, 17, 100, 1000, 5000, 12_000, 20_000]
    for b, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        t.put(keys[lo:hi], encode(keys[lo:hi], b))
        vectors, found = t.get(keys[:hi])
        assert found.all(), f"lost rows after batch {b}"
        check_vectors(keys[:hi], vectors)
    assert len(t) == 20_000
    assert t.capacity >= 20_000
    versions = check_vectors(keys, t.get(keys)[0])
    expect = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    assert versions.tolist() == expect.tolist()
    assert sorted(t.keys().tolist()) == sorted(keys.tolist())
    check_accounting(t)
    # the grown table is what a fresh handle sees too
    other = embkv.open(store.path, readonly=True)["t"]
    assert len(other) == 20_000 and other.get(keys)[1].all()


def test_str_table_growth_and_key_heap(store):
    t = store.create_table("t", dim=16, key_type="str", capacity=16)
    keys = [f"key-{i}-" + "é" * (i % 97) for i in range(3000)]
    for lo in range(0, 3000, 700):
        t.put(keys[lo : lo + 700], encode(np.arange(lo, min(lo + 700, 3000)), lo))
    vectors, found = t.get(keys)
    assert found.all()
    assert check_vectors(np.arange(3000), vectors).tolist() == [lo for lo in range(0, 3000, 700)
                                                                for _ in range(min(700, 3000 - lo))]
    assert sorted(t.keys()) == sorted(keys)
    check_accounting(t)


def test_delete_then_reinsert_reuses_space(store):
    t = store.create_table("t", dim=16, capacity=64)
    keys = np.arange(40, dtype=np.int64)
    t.put(keys, encode(keys, 0))
    for cycle in range(1, 61):
        gone = keys[cycle % 2 :: 2]
        assert t.delete(gone) == len(gone)
        assert not t.contains(gone).any()
        t.put(gone, encode(gone, cycle))
        # fresh keys that come and go leave tombstones behind
        fresh = np.arange(1000 + cycle * 10, 1010 + cycle * 10)
        t.put(fresh, encode(fresh, cycle))
        assert t.delete(fresh) == 10
    assert len(t) == 40
    vectors, found = t.get(keys)
    assert found.all()
    assert check_vectors(keys, vectors).tolist() == [60 if k % 2 == 0 else 59 for k in keys]
    assert t.capacity == 64, "tombstones and freed rows were not reused"
    check_accounting(t)


def test_str_delete_reinsert_cycles(store):
    t = store.create_table("t", dim=1, key_type="str", capacity=16)
    for cycle in range(200):
        t.put([f"k{cycle % 5}", "stay"], [[cycle], [cycle]])
        assert t.delete([f"k{cycle % 5}"]) == 1
    assert len(t) == 1 and t.get("stay")[0].tolist() == [[199]]
    assert t.capacity == 16
    check_accounting(t)


def test_updates_in_place_do_not_grow(store):
    t = store.create_table("t", dim=16, capacity=128)
    keys = np.arange(100)
    t.put(keys, encode(keys, 0))
    t.put(keys, encode(keys, 1))
    # copy-on-write updates reserve a fresh row per key of the batch, so rewriting all 100
    # rows may grow the table once; repeated rewrites must not keep growing it
    settled = t.capacity
    assert settled <= 256
    for version in range(2, 50):
        t.put(keys, encode(keys, version))
    assert t.capacity == settled and len(t) == 100
    assert (check_vectors(keys, t.get(keys)[0]) == 49).all()
    check_accounting(t)


# ------------------------------------------------------------------ export, load, persistence


def test_export_and_keys_roundtrip_int(store, rng):
    t = store.create_table("t", dim=16, dtype="float64")
    keys = rng.choice(10**12, size=500, replace=False).astype(np.int64)
    t.put(keys, encode(keys, 9))
    t.delete(keys[:50])
    ekeys, evecs = t.export()
    assert ekeys.dtype == np.int64 and evecs.dtype == np.float64
    assert sorted(ekeys.tolist()) == sorted(keys[50:].tolist()) == sorted(t.keys().tolist())
    check_vectors(ekeys, evecs)
    copy = store.load_table("copy", ekeys, evecs)
    assert copy.dtype == np.float64 and len(copy) == 450
    assert as_dict(*copy.export()) == as_dict(ekeys, evecs)
    ro = embkv.open(store.path, readonly=True)["t"]
    assert as_dict(*ro.export()) == as_dict(ekeys, evecs)


def test_export_and_keys_roundtrip_str(store):
    t = store.create_table("t", dim=16, key_type="str")
    keys = TRICKY_KEYS + BYTES_KEYS
    t.put(keys, encode(np.arange(len(keys)), 2))
    ekeys, evecs = t.export()
    assert sorted(map(repr, ekeys)) == sorted(map(repr, keys))
    for k, v in zip(ekeys, evecs, strict=True):
        assert v[0] == keys.index(k)
    copy = store.load_table("copy", ekeys, evecs)
    assert as_dict(*copy.export()) == as_dict(ekeys, evecs)
    ro = embkv.open(store.path, readonly=True)["t"]
    assert as_dict(*ro.export()) == as_dict(ekeys, evecs)


def test_load_table_creates_replaces_and_last_duplicate_wins(store):
    keys = np.array([1, 2, 3, 2])
    t = store.load_table("t", keys, encode(keys, [0, 0, 0, 1]))
    assert (t.dim, t.dtype, t.key_type, len(t)) == (16, np.float32, "int64", 3)
    assert check_vectors([1, 2, 3], t.get([1, 2, 3])[0]).tolist() == [0, 1, 0]
    same = store.load_table("t", [10, 11], encode([10, 11], 5))
    assert same is t
    assert len(t) == 2 and not t.contains([1, 2, 3]).any()
    assert check_vectors([10, 11], t.get([10, 11])[0]).tolist() == [5, 5]
    assert sorted(os.listdir(store.path)) == ["t.ekv", "t.ekv.lock", "t.ekv.wal"]


def test_load_table_dtype_and_capacity(store):
    t = store.load_table("h", np.arange(10), np.ones((10, 3)), dtype="float16", capacity=5000)
    assert t.dtype == np.float16 and t.capacity >= 5000
    assert store.load_table("f64", [1], np.ones((1, 2), dtype=np.float64)).dtype == np.float64
    assert store.load_table("i", [1], np.ones((1, 2), dtype=np.int32)).dtype == np.float32
    # an existing table keeps its dtype; new data is cast to it
    again = store.load_table("h", [1], np.full((1, 3), 2.5, dtype=np.float64))
    assert again.dtype == np.float16 and again.get([1])[0].tolist() == [[2.5, 2.5, 2.5]]


def test_load_table_from_npy_files(store, store_path, rng):
    os.makedirs(store_path, exist_ok=True)
    keys = rng.choice(10**9, size=300, replace=False).astype(np.int64)
    kpath = os.path.join(store_path, "keys.npy")
    vpath = os.path.join(store_path, "vecs.npy")
    np.save(kpath, keys)
    np.save(vpath, encode(keys, 4))
    t = store.load_table("t", kpath, vpath)
    assert len(t) == 300
    assert (check_vectors(keys, t.get(keys)[0]) == 4).all()


def test_load_table_from_arrow_and_parquet(store, store_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    keys = np.arange(100, 140, dtype=np.int64)
    vecs = encode(keys, 6)
    fixed = pa.table({"id": keys, "emb": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 16)})
    t = store.load_table("fixed", fixed, key_column="id", vector_column="emb")
    assert len(t) == 40 and (check_vectors(keys, t.get(keys)[0]) == 6).all()

    plain = pa.table({"key": [f"k{i}" for i in range(40)], "vector": [list(map(float, v)) for v in vecs]})
    path = os.path.join(store_path, "data.parquet")
    pq.write_table(plain, path)
    s = store.load_table("strs", path)
    assert s.key_type == "str" and len(s) == 40
    vectors, found = s.get([f"k{i}" for i in range(40)])
    assert found.all() and (check_vectors(keys, vectors) == 6).all()


def test_data_persists_across_store_handles(store_path):
    with embkv.open(store_path) as s:
        t = s.create_table("t", dim=16, capacity=16)
        t.put(np.arange(100), encode(np.arange(100), 1))
        s.create_table("s", dim=2, key_type="str").put(["x"], [[1, 2]])
    with embkv.open(store_path, readonly=True) as ro:
        assert ro.list_tables() == ["s", "t"]
        assert (check_vectors(np.arange(100), ro["t"].get(np.arange(100))[0]) == 1).all()
        assert ro["s"].get("x")[0].tolist() == [[1, 2]]
        assert ro["t"].readonly and ro.readonly


def test_store_listing_and_drop(store):
    a = store.create_table("a", dim=1)
    store.create_table("b.v2", dim=1, key_type="str")
    assert store.list_tables() == ["a", "b.v2"] == list(store)
    assert "a" in store and "c" not in store and 5 not in store
    assert store["a"] is a
    reader = embkv.open(store.path, readonly=True)["a"]
    store.drop_table("a")
    assert store.list_tables() == ["b.v2"]
    assert "a.ekv" not in os.listdir(store.path)
    with pytest.raises(embkv.TableNotFoundError):
        store["a"]
    with pytest.raises(embkv.TableNotFoundError):
        reader.get([1])
    with pytest.raises(embkv.TableNotFoundError):
        store.drop_table("a")
    b = store.create_table("a", dim=1)  # the name can be reused
    b.put([1], [[5]])
    assert store["a"].get([1])[0].tolist() == [[5]]


def test_create_table_exist_ok(store):
    t = store.create_table("t", dim=4, dtype="float16", key_type="str")
    t.put(["x"], [[1, 2, 3, 4]])
    again = store.create_table("t", dim=4, dtype=np.float16, key_type="str", exist_ok=True)
    assert again.get("x")[1].all()
    assert embkv.open(store.path).create_table("t", 4, "float16", "str", exist_ok=True).get("x")[1].all()


def test_info_reports_schema_and_counts(store):
    t = store.create_table("t", dim=8, dtype="float64", key_type="str", capacity=100)
    t.put(["a", "bb", "k" * 30], np.ones((3, 8)))
    t.delete(["a"])
    info = t.info()
    assert info["name"] == "t" and info["path"] == os.path.join(store.path, "t.ekv")
    assert (info["dim"], info["dtype"], info["key_type"]) == (8, "float64", "str")
    assert info["rows"] == 2 and info["capacity"] == 100 and info["deleted_slots"] == 1
    assert info["memory_only"] is True and info["kernel"] == embkv.KERNEL_BACKEND
    assert info["key_heap_bytes"].startswith("38/")  # short keys live in their row; the long one: length + bytes
    assert 0 < info["allocated_bytes"] <= info["file_bytes"]
    assert info["file_bytes"] == os.path.getsize(t.path)
    assert "'t'" in repr(t) and "2 rows" in repr(t) and store.path in repr(store)


# ------------------------------------------------------------------ other handles, mappings


def test_handles_follow_versions_published_elsewhere(store):
    t = store.create_table("t", dim=16)
    t.put([1, 2], encode([1, 2], 1))
    ro = embkv.open(store.path, readonly=True)["t"]
    other = embkv.open(store.path)
    other.load_table("t", [5, 6, 7], encode([5, 6, 7], 2))
    for handle in (t, ro):
        vectors, found = handle.get([1, 5, 6, 7])
        assert found.tolist() == [False, True, True, True]
        assert (check_vectors([5, 6, 7], vectors[1:]) == 2).all()
        assert len(handle) == 3
    # writes through a stale handle land in the newest version
    t.put([8], encode([8], 3))
    assert other["t"].get([8])[1].all() and len(other["t"]) == 4


def test_keys_follow_a_version_published_elsewhere(store):
    t = store.create_table("t", dim=16)
    t.put([1, 2], encode([1, 2], 1))
    embkv.open(store.path).load_table("t", [5, 6, 7], encode([5, 6, 7], 2))
    assert sorted(t.keys().tolist()) == [5, 6, 7]
    assert t.info()["rows"] == 3


def test_old_version_is_unmapped_after_switch(store):
    t = store.create_table("t", dim=4)
    t.put([1], np.ones((1, 4)))
    ro = embkv.open(store.path, readonly=True)["t"]
    assert ro.get([1])[1].all()
    store.load_table("t", [2], np.ones((1, 4)))
    assert ro.get([2])[1].all()  # switches
    assert not [line for line in mapped_files(store.path) if "(deleted)" in line]


def test_close_unmaps_the_file(store):
    t = store.create_table("t", dim=4)
    t.put([1], np.ones((1, 4)))
    t.close()
    assert mapped_files(store.path) == []

# ---------------------------------------------------------------- row tags


def test_tags_survive_reopen_and_copy(store, store_path):
    t = store.create_table("t", dim=2, tags=True)
    t.put([1, 2], np.ones((2, 2)), tags=[11, 22])
    store.copy_table("t", store, "t2")
    with embkv.open(store_path, readonly=True) as again:
        assert again["t"].get_tagged([1, 2])[2].tolist() == [11, 22]
        assert again["t2"].get_tagged([2, 1])[2].tolist() == [22, 11]


def test_read_rows_reads_like_get_through_batched_preads(disk_store_path):
    s = embkv.open(disk_store_path)
    t = s.load_table("t", np.arange(0, 20_000, 2), np.arange(10_000 * 8, dtype=np.float32).reshape(-1, 8))
    keys = np.array([0, 2, 3, 19_998, 4_000, -1, 2])
    for threads in (1, 3, 64):
        got, found = t.read_rows(keys, threads)
        want, want_found = t.get(keys)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(got[found], want[found])
        assert (got[~found] == 0).all()
    q = s.load_table("q", np.arange(10), np.ones((10, 4)), dtype="int8")  # other tables: read with get
    np.testing.assert_array_equal(q.read_rows([3, 11])[1], [True, False])
    t.release_pages()
    assert t.get([2])[1][0]  # mapped again on the next access
    s.close()
