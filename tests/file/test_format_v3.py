"""Format version 3: rows without a tag word unless asked for, int8 and bfloat16 rows, version-2 files.

(The table contract for quantized rows is in the conformance suite; this file holds what is
the file table's own: sizes, the on-disk form, old files, crash replay, check and repair.)
"""

from __future__ import annotations

import os
import signal
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

import embkv
from embkv.cli import main as cli_main
from embkv.file.check import check_table
from embkv.file.codec import decode_rows, encode_rows
from embkv.file.format import FORMAT_VERSION
from helpers import check_vectors, die_in_put_packed, encode, fork_and_run

V2_FIELDS = struct.Struct("<8sIIIIII QQQQ QQQQ QQ")  # the version-2 header: CRC at 112, no flags


def as_version_2(path: str) -> None:
    """Rewrite a tagged version-3 file's header as embkv 0.2 wrote it (the sections are the same)."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(128))
        fields = list(V2_FIELDS.unpack_from(head))
        fields[1] = 2
        fixed = V2_FIELDS.pack(*fields)
        head[: len(fixed)] = fixed
        head[112:116] = struct.pack("<I", zlib.crc32(fixed))
        head[116:128] = bytes(12)
        f.seek(0)
        f.write(head)


# ------------------------------------------------------------------ row sizes


@pytest.mark.parametrize(("key_type", "tags", "header"), [("int64", False, 16), ("int64", True, 24),
                                                          ("str", False, 56), ("str", True, 64)])
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


def test_bulk_load_is_sized_to_the_data(store):
    n = 100_000
    t = store.load_table("t", np.arange(n), np.zeros((n, 16), dtype=np.float32))
    assert n < t.capacity <= n + n // 32 + 1
    per_row = t.info()["bytes_per_row"]
    assert per_row["spare"] <= 0.04 * (16 + 64) and per_row["row_header"] == 16
    assert set(per_row) == {"vector", "row_header", "index", "spare", "free_list", "key_heap", "total",
                            "overhead"}
    assert per_row["total"] == pytest.approx(t.info()["file_bytes"] / n, abs=0.01)


def test_embkv_info_prints_bytes_per_row(store):
    store.load_table("t", np.arange(1000), np.zeros((1000, 8), dtype=np.float32))
    out = CliRunner().invoke(cli_main, ["info", store.path, "t"])
    assert out.exit_code == 0, out.output
    assert "bytes/row (32 vector +" in out.output and "load_factor" in out.output
    assert "index" in out.output and "format_version  3" in out.output


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


def test_a_version_2_header_cannot_name_a_version_3_dtype(store):
    store.create_table("t", dim=4, tags=True).close()
    path = os.path.join(store.path, "t.ekv")
    as_version_2(path)
    _set_field(path, 20, 4, crc_at=112)  # dtype code 4 (int8) did not exist in version 2
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


# ------------------------------------------------------------------ version-2 files


def test_version_2_files_open_read_write_and_upgrade(store):
    t = store.create_table("t", dim=16, tags=True)
    keys = np.arange(500)
    t.put(keys, encode(keys, 1), tags=keys + 7)
    t.close()
    as_version_2(os.path.join(store.path, "t.ekv"))
    reader = embkv.open(store.path, readonly=True)["t"]
    assert reader.info()["format_version"] == 2 and reader.tagged
    assert (check_vectors(keys, reader.get(keys)[0]) == 1).all()
    writer = embkv.open(store.path)["t"]
    writer.put([1000], encode([1000], 2), tags=[5])  # written in place: still version 2
    assert writer.info()["format_version"] == 2 and check_table(writer.path).ok
    out = CliRunner().invoke(cli_main, ["upgrade", store.path])
    assert out.exit_code == 0 and "t: upgraded from format version 2 to 3" in out.output, out.output
    everything = np.append(keys, 1000)
    vectors, found, tags = reader.get_tagged(everything)  # the open reader switched to the new version
    assert reader.info()["format_version"] == 3 and found.all()
    assert check_vectors(everything, vectors).tolist() == [1] * 500 + [2]
    assert tags.tolist() == [*(keys + 7).tolist(), 5]
    again = CliRunner().invoke(cli_main, ["upgrade", store.path, "t"])
    assert "t: already format version 3" in again.output
