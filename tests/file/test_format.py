"""Format version 4: compact rows and index, sparse sections, int8 and bfloat16 rows, old files.

(The table contract for quantized rows is in the conformance suite; this file holds what is
the file table's own: sizes, the on-disk form, old files, crash replay, check and repair.)
"""

from __future__ import annotations

import os
import signal
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import embkv
from embkv.cli import main as cli_main
from embkv.file.check import check_table
from embkv.file.codec import decode_rows, encode_rows
from embkv.file.format import COUNTERS_OFFSET, FORMAT_VERSION, Counter
from embkv.file.legacy import write_legacy
from helpers import die_in_put_packed, encode, fork_and_run

# ------------------------------------------------------------------ row sizes


@pytest.mark.parametrize(("key_type", "tags", "header"), [("int64", False, 16), ("int64", True, 24),
                                                          ("str", False, 32), ("str", True, 40)])
def test_the_tag_word_is_only_in_tables_that_ask_for_it(store, key_type, tags, header):
    t = store.create_table("t", dim=16, key_type=key_type, tags=tags)
    assert t.tagged is tags and t.capabilities.tagged is tags
    info = t.info()
    assert info["bytes_per_row"]["row_header"] == header and info["format_version"] == FORMAT_VERSION
    assert info["tagged"] is tags


@pytest.mark.parametrize(("dtype", "vector_bytes"), [("float32", 256), ("float16", 128), ("bfloat16", 128),
                                                     ("int8", 68), ("float64", 512)])
def test_stored_bytes_per_vector(store, dtype, vector_bytes):
    t = store.create_table("t", dim=64, dtype=dtype)
    info = t.info()
    assert info["bytes_per_row"]["vector"] == vector_bytes and info["dtype"] == dtype
    assert info["read_dtype"] == ("float64" if dtype == "float64" else "float16" if dtype == "float16"
                                  else "float32")


@pytest.mark.parametrize(("key_type", "limit"), [("int64", 32), ("str", 48)])
def test_bulk_load_costs_at_most_the_target_beyond_the_vector(store, key_type, limit):
    n = 100_000
    keys = np.arange(n) if key_type == "int64" else [f"item:{i * 7919}" for i in range(n)]
    t = store.load_table("t", keys, np.zeros((n, 16), dtype=np.float32))
    assert n < t.capacity <= n + n // 32 + 1
    info = t.info()
    per_row = info["bytes_per_row"]
    assert set(per_row) == {"vector", "row_header", "index", "spare", "free_list", "key_heap", "total",
                            "overhead"}
    assert per_row["row_header"] == (16 if key_type == "int64" else 32) and per_row["key_heap"] == 0
    assert per_row["spare"] == 0 and per_row["free_list"] == 0
    assert per_row["index"] <= 11  # 8-byte slots at 73% load
    assert per_row["total"] == pytest.approx(info["allocated_bytes"] / n, abs=0.01)
    assert per_row["overhead"] <= limit, per_row
    assert info["allocated_bytes"] < info["file_bytes"]  # the spare rows are a hole


@pytest.mark.parametrize(("key_type", "limit"), [("int64", 32), ("str", 48)])
def test_random_puts_stay_within_the_target(store, key_type, limit):
    n = 100_000  # the batch in flight and the reservation granule cost under 2 bytes a row at this size
    rng = np.random.default_rng(5)
    t = store.create_table("t", 16, key_type=key_type)
    for _ in range(300):
        picked = rng.integers(0, n, 1000)
        keys = picked if key_type == "int64" else [f"item:{k}" for k in picked.tolist()]
        t.put(keys, np.ones((1000, 16), dtype=np.float32))
    per_row = t.info()["bytes_per_row"]
    assert per_row["overhead"] <= limit, per_row
    assert len(t) > 0.9 * n


def test_the_sections_beyond_the_index_are_allocated_as_the_writer_reaches_them(store):
    t = store.create_table("t", dim=64, capacity=200_000)
    info = t.info()
    index_and_header = 4096 + info["index_slots"] * 8
    assert info["allocated_bytes"] <= index_and_header + 4096 < info["file_bytes"] // 10
    t.put(np.arange(1000), np.ones((1000, 64), dtype=np.float32))
    grown = t.info()["allocated_bytes"] - info["allocated_bytes"]
    assert 1000 * (16 + 256) <= grown <= 1000 * (16 + 256) + 2 * (64 << 10)  # rows, plus reservation granules
    copy = store.copy_table("t", store, "c")  # a copy stays as sparse as its source
    assert copy.info()["allocated_bytes"] <= t.info()["allocated_bytes"] + 4096
    assert (copy.get(np.arange(1000))[0] == 1).all()


def test_long_string_keys_go_to_the_heap_and_short_ones_stay_in_their_row(store):
    t = store.create_table("t", dim=4, key_type="str")
    short, exactly, long_ = "s" * 3, "e" * 24, "l" * 25
    t.put([short, exactly, long_], np.arange(12, dtype=np.float32).reshape(3, 4))
    assert t.info()["key_heap_bytes"].startswith(f"{8 + 25}/")
    t.put([long_], np.zeros((1, 4), dtype=np.float32))  # rewriting a long key shares its heap bytes
    assert t.info()["key_heap_bytes"].startswith(f"{8 + 25}/")
    vectors, found = t.get([short, exactly, long_, "l" * 26, "e" * 23, "l" * 24])
    assert found.tolist() == [True, True, True, False, False, False]
    assert vectors[:3, 0].tolist() == [0, 4, 0]
    assert sorted(t.keys()) == sorted([short, exactly, long_]) and check_table(t.path).ok


def test_embkv_info_prints_bytes_per_row(store):
    store.load_table("t", np.arange(1000), np.zeros((1000, 8), dtype=np.float32))
    out = CliRunner().invoke(cli_main, ["info", store.path, "t"])
    assert out.exit_code == 0, out.output
    assert "bytes/row (32 vector +" in out.output and "load_factor" in out.output
    assert "index" in out.output and f"format_version  {FORMAT_VERSION}" in out.output


# ------------------------------------------------------------------ quantized rows


def test_int8_rows_are_stored_as_codes_and_a_scale(store):
    t = store.create_table("t", dim=4, dtype="int8")
    t.put([1], [[1.0, -2.0, 0.5, 127.0]])
    raw = encode_rows(np.array([[1.0, -2.0, 0.5, 127.0]]), "int8")
    assert raw.tobytes() == struct.pack("<f", 1.0) + bytes([1, 254, 0, 127])  # scale 1: codes 1, -2, 0 (0.5 -> even)
    assert t.get([1])[0].tolist() == [[1.0, -2.0, 0.0, 127.0]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_refuses_values_a_scale_cannot_hold_and_writes_nothing(store, bad):
    t = store.create_table("t", dim=3, dtype="int8")
    t.put([1], [[1, 2, 3]])
    before = t.get([1])[0].tolist()
    with pytest.raises(embkv.SchemaError, match="finite"):
        t.put([1, 2], [[4, 5, 6], [1, bad, 0]])
    assert len(t) == 1 and t.get([1])[0].tolist() == before
    with pytest.raises(embkv.SchemaError, match="finite"):
        store.load_table("t", [5, 6], np.array([[0, 0, 0], [bad, 1, 1]], dtype=np.float32))
    assert sorted(t.keys().tolist()) == [1]


def test_bfloat16_rounds_like_ml_dtypes(store):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(4000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 4000),
                        np.array([0.0, -0.0, 1.00390625, 1.01171875, 3.3895314e38, 3.4e38, -3.4e38, np.inf,
                                  -np.inf, 1e-40, -1e-45], dtype=np.float32)]).astype(np.float32)
    x = x[: len(x) // 5 * 5].reshape(-1, 5)
    t = store.create_table("t", dim=5, dtype="bfloat16")
    with np.errstate(over="ignore"):
        t.put(np.arange(len(x)), x)
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    got = t.get(np.arange(len(x)))[0]
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    nan = t.put([10**6], [[np.nan, -np.nan, 1, 2, 3]]) or t.get([10**6])[0][0]
    assert np.isnan(nan[:2]).all() and nan[2:].tolist() == [1, 2, 3]


def test_codec_roundtrip_matches_what_the_kernel_reads(store):
    x = np.random.default_rng(3).standard_normal((50, 9)).astype(np.float32)
    for dtype in ("int8", "bfloat16"):
        t = store.create_table(dtype, dim=9, dtype=dtype)
        t.put(np.arange(50), x)
        np.testing.assert_array_equal(t.get(np.arange(50))[0], decode_rows(encode_rows(x, dtype), dtype, 9))


def test_int8_table_grows_replays_checks_and_repairs(disk_store_path):
    with embkv.open(disk_store_path, sync="always") as s:
        s.create_table("t", 16, dtype="int8", capacity=16)

    def write() -> None:
        t = embkv.open(disk_store_path, sync="always")["t"]
        t.put(np.arange(100), encode(np.arange(100), 1))  # grows past 16 rows
        die_in_put_packed(after_calls=1)
        t.put(np.arange(100, 110), encode(np.arange(100, 110), 2))  # logged, then killed

    status, text = fork_and_run(write)
    assert os.WTERMSIG(status) == signal.SIGKILL, text
    t = embkv.open(disk_store_path)["t"]  # the writable open replays the logged batch
    keys = np.arange(110)
    vectors, found = t.get(keys)
    assert found.all()
    want = encode(keys, np.where(keys < 100, 1, 2))
    assert (np.abs(vectors - want).max(axis=1) <= np.abs(want).max(axis=1) / 254 * 1.0001).all()
    assert check_table(t.path).ok
    kept = embkv.open(disk_store_path)["t"]
    from embkv.file.check import repair_table

    assert repair_table(kept) == {"kept": 110, "dropped": 0}
    np.testing.assert_array_equal(kept.get(keys)[0], vectors)


# ------------------------------------------------------------------ headers


def _set_field(path: str, offset: int, value: int, crc_at: int = 120) -> None:
    with open(path, "r+b") as f:
        head = bytearray(f.read(128))
        struct.pack_into("<I", head, offset, value)
        struct.pack_into("<I", head, crc_at, zlib.crc32(bytes(head[:crc_at])))
        f.seek(0)
        f.write(head)


@pytest.mark.parametrize(("offset", "value"), [(112, 2), (112, 0x80000000), (116, 1), (116, 0xDEADBEEF)])
def test_unknown_flags_and_a_used_reserved_word_are_refused(store, offset, value):
    store.create_table("t", dim=4).close()
    path = os.path.join(store.path, "t.ekv")
    _set_field(path, offset, value)
    with pytest.raises(embkv.CorruptTableError, match="out of range"):
        embkv.open(store.path, readonly=True)["t"]


def test_the_tag_flag_must_match_the_row_layout(store):
    store.create_table("t", dim=4).close()
    path = os.path.join(store.path, "t.ekv")
    _set_field(path, 112, 1)  # claims tagged rows: the row header no longer matches the header fields
    with pytest.raises(embkv.CorruptTableError):
        embkv.open(store.path, readonly=True)["t"]


def test_create_table_exist_ok_takes_an_existing_table_as_it_is(store):
    store.create_table("t", dim=4, tags=True)
    again = store.create_table("t", dim=4, exist_ok=True)  # tags not said: whatever it has
    assert again.tagged
    with pytest.raises(embkv.SchemaError, match="tags=True"):
        store.create_table("t", dim=4, exist_ok=True, tags=False)


def test_export_then_load_keeps_the_stored_dtype_and_tags(store, tmp_path):
    t = store.create_table("t", dim=8, dtype="int8", tags=True)
    t.put(np.arange(50), np.random.default_rng(1).standard_normal((50, 8)))
    out = str(tmp_path / "t.npz")
    runner = CliRunner()
    assert runner.invoke(cli_main, ["export", store.path, "t", out]).exit_code == 0
    other = str(tmp_path / "other")
    result = runner.invoke(cli_main, ["load", "-q", other, "t", out])
    assert result.exit_code == 0, result.output
    back = embkv.open(other)["t"]
    assert back.stored_dtype == "int8" and back.tagged and len(back) == 50
    np.testing.assert_array_equal(back.get(np.arange(50))[0], t.get(np.arange(50))[0])  # codes re-quantize exactly
    plain = runner.invoke(cli_main, ["load", "-q", other, "u", out, "--dtype", "float32", "--no-tags"])
    assert plain.exit_code == 0 and not embkv.open(other)["u"].tagged


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_export_then_load_keeps_the_row_tags(store, tmp_path, suffix):
    t = store.create_table("t", dim=4, tags=True)
    t.put(np.arange(20), np.ones((20, 4)), tags=np.arange(20, dtype=np.uint64) * 2**33 + 5)
    out = str(tmp_path / f"t{suffix}")
    runner = CliRunner()
    assert runner.invoke(cli_main, ["export", store.path, "t", out]).exit_code == 0
    other = str(tmp_path / "other")
    if suffix == ".parquet":  # a Parquet export records no table form: say it
        assert runner.invoke(cli_main, ["create", other, "t", "--dim", "4", "--tags"]).exit_code == 0
    result = runner.invoke(cli_main, ["load", "-q", other, "t", out])
    assert result.exit_code == 0, result.output
    keys, _, tags = embkv.open(other)["t"].export_tagged()
    assert dict(zip(keys.tolist(), tags.tolist(), strict=True)) == {k: k * 2**33 + 5 for k in range(20)}


def test_row_tags_need_a_tagged_table(store):
    with pytest.raises(embkv.SchemaError, match="tags=True"):
        store.load_table("t", [1, 2], np.ones((2, 4)), row_tags=[1, 2])
    t = store.load_table("t", [1, 2], np.ones((2, 4)), tags=True, row_tags=[7, 8])
    assert t.get_tagged([1, 2])[2].tolist() == [7, 8]


def test_export_to_a_missing_folder_says_so(store, tmp_path):
    store.create_table("t", dim=4)
    out = CliRunner().invoke(cli_main, ["export", store.path, "t", str(tmp_path / "nowhere" / "t.npz")])
    assert out.exit_code != 0 and "does not exist" in out.output


# ------------------------------------------------------------------ old files: embkv upgrade


def _legacy(store_path: str, version: int, key_type: str, dtype: str = "float32", tagged: bool = True) -> tuple:
    os.makedirs(store_path, exist_ok=True)
    n = 500
    keys = np.arange(n) * 3 if key_type == "int64" else [f"user-{i}" for i in range(n - 5)] + [
        f"a-user-id-longer-than-the-row-{i}" for i in range(5)]
    floats = np.random.default_rng(version).normal(size=(n, 16)).astype(np.float32)
    stored = encode_rows(floats, dtype)
    tags = np.arange(n, dtype=np.uint64) + 7 if tagged else None
    write_legacy(os.path.join(store_path, "t.ekv"), keys if key_type == "int64" else list(keys), stored,
                 dtype=dtype, version=version, tagged=tagged, tags=tags)
    return keys, floats, tags


@pytest.mark.parametrize(("version", "key_type", "dtype", "tagged"), [
    (2, "int64", "float32", True), (2, "str", "float16", True), (3, "int64", "int8", False),
    (3, "str", "bfloat16", True)])
def test_old_files_are_refused_with_the_command_and_upgraded_without_loss(store_path, version, key_type, dtype,
                                                                          tagged):
    keys, floats, tags = _legacy(store_path, version, key_type, dtype, tagged)
    path = os.path.join(store_path, "t.ekv")
    with pytest.raises(embkv.FormatVersionError, match=r"embkv upgrade STORE \[TABLE\]"):
        embkv.open(store_path)["t"]
    with open(path, "rb") as old:  # an embkv 0.2 reader still mapping the old file
        out = CliRunner().invoke(cli_main, ["upgrade", store_path])
        assert out.exit_code == 0 and f"t: upgraded to format version {FORMAT_VERSION}" in out.output, out.output
        old.seek(COUNTERS_OFFSET + 8 * Counter.SUPERSEDED)
        assert struct.unpack("<Q", old.read(8))[0] == 1  # told to let go
    t = embkv.open(store_path, readonly=True)["t"]
    assert t.info()["format_version"] == FORMAT_VERSION and t.stored_dtype == dtype and t.tagged is tagged
    vectors, found, got_tags = t.get_tagged(list(keys) if key_type == "str" else keys)
    assert found.all() and len(t) == len(keys)
    assert np.array_equal(vectors, decode_rows(encode_rows(floats, dtype), dtype, floats.shape[1]))
    assert got_tags.tolist() == (tags.tolist() if tagged else [0] * len(keys))
    assert check_table(t.path).ok
    again = CliRunner().invoke(cli_main, ["upgrade", store_path, "t"])
    assert f"t: already format version {FORMAT_VERSION}" in again.output


def test_upgrade_refuses_a_file_whose_embkv_0_2_writer_died_inside_a_batch(store_path):
    _legacy(store_path, 2, "int64")
    path = os.path.join(store_path, "t.ekv")
    with open(path, "r+b") as f:
        f.seek(COUNTERS_OFFSET + 8 * Counter.DIRTY)
        f.write(struct.pack("<Q", 4242))
    out = CliRunner().invoke(cli_main, ["upgrade", store_path, "t"])
    assert out.exit_code != 0 and "pid 4242" in out.output and "embkv 0.2" in out.output, out.output
    with pytest.raises(embkv.FormatVersionError):  # left as it was
        embkv.open(store_path)["t"]


def test_upgrade_of_a_damaged_old_file_is_a_clear_error(store_path):
    _legacy(store_path, 2, "int64")
    path = os.path.join(store_path, "t.ekv")
    with open(path, "r+b") as f:
        f.seek(40)  # the row stride
        f.write(struct.pack("<Q", 3))
    with pytest.raises(embkv.CorruptTableError, match="checksum"):
        embkv.open(store_path).upgrade_table("t")


# ------------------------------------------------------------------ review findings (format 4)


@pytest.mark.parametrize("length", [25, 40, 300])
def test_many_long_string_keys_put_grow_and_load(store, length):
    keys = [f"{i:0{length}d}" for i in range(3000)]
    t = store.create_table("t", dim=4, key_type="str")
    for lo in range(0, 3000, 500):  # growth must size the heap for length words too
        t.put(keys[lo : lo + 500], np.full((500, 4), lo, dtype=np.float32))
    assert t.get(keys)[1].all() and check_table(t.path).ok
    loaded = store.load_table("l", keys, np.ones((3000, 4), dtype=np.float32))
    assert loaded.get(keys)[1].all() and len(loaded) == 3000


def test_a_load_with_duplicate_keys_keeps_the_last_and_leaks_no_row(store):
    keys = np.array([5, 1, 5, 2, 1, 5])
    t = store.load_table("t", keys, np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 4), dtype=np.float32))
    assert t.get([5, 1, 2])[0][:, 0].tolist() == [5, 4, 3]
    info = t.info()
    assert info["rows_used"] - info["free_rows"] == info["rows"] == 3
    s = store.load_table("s", ["a", b"a", "b"], np.arange(3, dtype=np.float32)[:, None] * np.ones((1, 4)))
    assert s.get(["a", "b"])[0][:, 0].tolist() == [1, 2] and len(s) == 2


_KERNEL_OPS = """
import sys, numpy as np, embkv
s = embkv.open(sys.argv[1])
rng = np.random.default_rng(3)
t = s.create_table("i", 6, dtype="int8", tags=True)
u = s.create_table("s", 3, dtype="bfloat16", key_type="str")
for step in range(40):
    k = rng.integers(0, 400, 30)
    t.put(k, rng.normal(size=(30, 6)), tags=k.astype(np.uint64) + 1)
    names = [("x" * int(j % 40)) + str(j) for j in k.tolist()]
    u.put(names, rng.normal(size=(30, 3)))
    if step % 5 == 4:
        t.delete(k[:10])
        u.delete(names[:10])
s.close()
"""


def test_the_c_and_numpy_kernels_write_byte_identical_files(tmp_path):
    import subprocess
    import sys

    if embkv.KERNEL_BACKEND != "c":
        pytest.skip("needs the C kernel")
    folders = {}
    for kernel in ("c", "numpy"):
        folder = str(tmp_path / kernel)
        env = dict(os.environ, EMBKV_KERNEL=kernel if kernel == "numpy" else "")
        proc = subprocess.run([sys.executable, "-c", _KERNEL_OPS, folder], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        folders[kernel] = folder
    for name in ("i.ekv", "s.ekv"):
        a = np.fromfile(os.path.join(folders["c"], name), dtype=np.uint8)
        b = np.fromfile(os.path.join(folders["numpy"], name), dtype=np.uint8)
        assert len(a) == len(b)
        differ = np.flatnonzero(a != b)
        assert set(differ.tolist()) <= set(range(104, 112)) | set(range(120, 124)), (name, differ[:10])  # stamp, CRC


def test_upgrade_refuses_an_old_file_with_damaged_rows(store_path):
    _legacy(store_path, 2, "str")
    path = os.path.join(store_path, "t.ekv")
    with open(path, "rb") as f:
        head = f.read(128)
    rows_offset, stride = struct.unpack_from("<Q", head, 88)[0], struct.unpack_from("<I", head, 32)[0]
    with open(path, "r+b") as f:  # one byte of some row's vector
        f.seek(rows_offset + 3 * stride + stride - 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(embkv.CorruptTableError, match=r"damaged.*embkv repair"):
        embkv.open(store_path).upgrade_table("t")


def test_upgrade_refuses_an_old_log_from_before_a_reboot(disk_store_path):
    from embkv.file.wal import WriteAheadLog, boot_id, wal_path

    _legacy(disk_store_path, 2, "int64")
    path = os.path.join(disk_store_path, "t.ekv")
    log = WriteAheadLog(wal_path(path), "always", 1.0, durable=True)
    log.reset(1, 0)  # write_legacy stamps created_ns = 1
    log.close()
    with open(wal_path(path), "r+b") as f:  # as if written before the last boot
        data = bytearray(f.read())
        at = data.find(boot_id())
        assert at > 0
        data[at] ^= 0x01
        f.seek(0)
        f.write(bytes(data))
    with pytest.raises(embkv.StorageError, match="before the last reboot"):
        embkv.open(disk_store_path).upgrade_table("t")


@pytest.mark.parametrize("field", [(64, 1 << 40), (88, 1 << 40), (48, 3)])  # index off, rows off, slot count
def test_a_damaged_old_header_is_a_corrupt_table_error(store_path, field):
    _legacy(store_path, 3, "int64", tagged=False)
    path = os.path.join(store_path, "t.ekv")
    offset, value = field
    with open(path, "r+b") as f:
        head = bytearray(f.read(128))
        struct.pack_into("<Q", head, offset, value)
        struct.pack_into("<I", head, 120, zlib.crc32(bytes(head[:120])))
        f.seek(0)
        f.write(head)
    with pytest.raises(embkv.CorruptTableError):
        embkv.open(store_path).upgrade_table("t")


def _small_tmpfs(tmp_path: Any) -> str:
    import subprocess

    mount = str(tmp_path / "tiny")
    os.makedirs(mount)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mount], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    return mount


def test_a_full_tmpfs_refuses_the_batch_before_writing_and_forgets_it(tmp_path):
    import subprocess

    mount = _small_tmpfs(tmp_path)
    try:
        s = embkv.open(os.path.join(mount, "store"))
        t = s.create_table("t", dim=64, capacity=100_000)
        done = 0
        with pytest.raises(embkv.StorageError):
            for lo in range(0, 100_000, 1000):
                t.put(np.arange(lo, lo + 1000), np.ones((1000, 64), dtype=np.float32))
                done = lo + 1000
        try:  # deletes need room on the free-row stack: done, or refused whole
            deleted = t.delete(np.arange(0, done))
        except embkv.StorageError:
            deleted = 0
        assert len(t) == done - deleted
        s.close()
        again = embkv.open(os.path.join(mount, "store"))["t"]
        assert len(again) == done - deleted and check_table(again.path).ok
        assert not again.contains([done])[0]  # the refused batch is not replayed
        again.close()
    finally:
        subprocess.run(["umount", "-l", mount], capture_output=True)
