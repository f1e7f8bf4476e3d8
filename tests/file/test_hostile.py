"""Hostile input (issue item 3): damaged and foreign files, and garbage through the public API.

The file fuzzer takes a small valid table file (int keys, str keys) with overwritten rows,
deleted keys and free rows, applies 1-3 random mutations (truncation, bit flips aimed at the
header, counters, index, rows, free list and key heap, random byte runs, header fields
overwritten with random values -- huge capacities included -- with the header CRC-32 at byte
120 recomputed over bytes 0..119), then, in this process (a segfault would kill pytest):

- opening raises an ``EmbkvError`` subclass or succeeds; if it succeeds, reads and writes
  work or raise ``EmbkvError``;
- ``check_table`` returns a report and never raises;
- from the bytes that changed, the test works out what must happen: a shorter file or a
  damaged header (CRC no longer matching) must be refused at open and reported as fatal;
  a changed byte in a live structure (a live or tombstoned index slot, an empty slot's row
  field, a live row's key fields, vector or checksum/odd bit, a live string key's bytes, the
  live/tombstone counters, the dirty flag) must be reported by check; a change confined to
  unused space (padding of the header page, free rows, an empty slot's key) must change
  nothing at all; anything else (a CRC-valid header rewrite, the free list, other counters)
  only has to be safe;
- time per example is bounded (hypothesis deadline, and an alarm turns a hang into a
  failure) and so is memory (max RSS growth over the whole fuzz run).

The API fuzzer throws keys and vectors of every shape and type at put/get/delete/contains and
checks that only typed errors come out and that a refused call changed nothing.

Regression (``SUPERSEDED_BYTES``): a current file whose ``superseded`` counter was set used to
make every lookup loop forever; see test_superseded_flag_in_current_file_does_not_hang.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra import numpy as hnp

import embkv
from conftest import LONG_LIVED, PREFIX, SHM, TMP, new_store_path
from embkv.cli import main as cli_main
from embkv.file.check import CheckReport, check_table
from embkv.file.format import COUNTERS_OFFSET, FORMAT_VERSION, MAX_CAPACITY, Layout

CRC_OFFSET = 120
IMMUTABLE_END = CRC_OFFSET + 4
SUPERSEDED_BYTES = (COUNTERS_OFFSET + 6 * 8, COUNTERS_OFFSET + 7 * 8)
MUST_DETECT_COUNTERS = [(COUNTERS_OFFSET + 8, COUNTERS_OFFSET + 16),  # live keys
                        (COUNTERS_OFFSET + 40, COUNTERS_OFFSET + 48),  # tombstones
                        (COUNTERS_OFFSET + 56, COUNTERS_OFFSET + 64)]  # dirty
# the immutable header fields: (offset, struct format)
HEADER_FIELDS = [(8, "<I"), (12, "<I"), (16, "<I"), (20, "<I"), (24, "<I"), (28, "<I"), (32, "<Q"), (40, "<Q"),
                 (48, "<Q"), (56, "<Q"), (64, "<Q"), (72, "<Q"), (80, "<Q"), (88, "<Q"), (96, "<Q"), (104, "<Q"),
                 (112, "<I"), (116, "<I")]  # flags, reserved
ROW_FIELD = 2**40 - 1  # an index slot: fingerprint << 40 | row field (0 empty, all ones tombstone, row + 1)
SEQ_UNCHECKED = 0x00FFFFFE  # bits of a row's seq word no checksum covers: its write count
EXAMPLES = int(os.environ.get("EMBKV_FUZZ_EXAMPLES", "1000"))  # per key type; raise it for a deeper run
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RSS_LIMIT_KIB = 200 * 1024


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_home() -> Iterator[None]:
    """Hypothesis keeps caches (constants, unicode data) under ./.hypothesis even with database=None:
    point it at a temp folder for this module and remove that afterwards, so nothing is left."""
    home = tempfile.mkdtemp(prefix=PREFIX + "hypothesis-", dir=TMP)
    LONG_LIVED.add(home)
    set_hypothesis_home_dir(home)
    try:
        yield
    finally:
        set_hypothesis_home_dir(None)
        shutil.rmtree(home, ignore_errors=True)
        LONG_LIVED.discard(home)


# ------------------------------------------------------------------ base files and what is live in them


class Base:
    """A valid table file and a map of which of its bytes are live structure."""

    def __init__(self, path: str, key_type: str) -> None:
        self.key_type = key_type
        with open(path, "rb") as f:
            self.data = f.read()
        self.layout = lay = Layout.parse(self.data[:4096], len(self.data))
        t = embkv.open(os.path.dirname(path), readonly=True)[key_type]
        self.keys, self.vectors = t.export()
        t.close()
        raw = np.frombuffer(self.data, dtype=np.uint8)
        self._count_bits: list[int] = []  # offsets of live rows' seq words
        # 0: unused (must change nothing), 1: must be detected, 2: anything goes (safety only)
        cls = np.zeros(len(raw), dtype=np.uint8)
        cls[:IMMUTABLE_END] = 1  # handled apart (CRC)
        cls[COUNTERS_OFFSET : COUNTERS_OFFSET + 64] = 2
        for lo, hi in MUST_DETECT_COUNTERS:
            cls[lo:hi] = 1
        slots = np.frombuffer(self.data, dtype=np.uint64, count=lay.slot_count, offset=lay.index_offset)
        for i, word in enumerate(slots.tolist()):
            at = lay.index_offset + 8 * i
            field = word & ROW_FIELD
            if field in (0, ROW_FIELD):
                cls[at : at + 5] = 1  # an empty slot's or tombstone's fingerprint is unused; its row field is not
            else:
                cls[at : at + 8] = 1
                r = field - 1
                start = lay.rows_offset + r * lay.row_stride
                cls[start : start + lay.row_header + lay.vec_bytes] = 1
                # seq word: bits 1..23 count writes and are not covered by the checksum
                self._count_bits.append(start)
                seq = int.from_bytes(self.data[start : start + 8], "little")
                if key_type == "str" and (seq >> 24) & 0xFF == 255:  # a long key: length and bytes in the heap
                    off = int.from_bytes(self.data[start + 24 : start + 32], "little")
                    length = int.from_bytes(self.data[lay.heap_offset + off : lay.heap_offset + off + 8], "little")
                    cls[lay.heap_offset + off : lay.heap_offset + off + 8 + length] = 1
        cls[lay.freelist_offset : lay.freelist_offset + 8 * lay.row_capacity] = 2
        self.cls = cls

    def expectation(self, mutated: bytes) -> str:
        """'raise', 'detect', 'none' (nothing may change) or 'any' (only safety) for ``mutated``."""
        if len(mutated) < self.layout.file_size:
            return "raise"
        n = len(self.data)
        a = np.frombuffer(self.data, dtype=np.uint8)
        b = np.frombuffer(mutated[:n], dtype=np.uint8)
        diff = a != b
        for start in self._count_bits:  # changes confined to the write counter of a seq word
            word_a = int.from_bytes(self.data[start : start + 8], "little")
            word_b = int.from_bytes(mutated[start : start + 8], "little")
            if word_a != word_b and not (word_a ^ word_b) & ~SEQ_UNCHECKED:
                diff[start : start + 8] = False
        changed = np.flatnonzero(diff)
        if not len(changed):
            return "none"
        if changed[0] < IMMUTABLE_END:
            crc_ok = zlib.crc32(mutated[:CRC_OFFSET]) == struct.unpack_from("<I", mutated, CRC_OFFSET)[0]
            return "any" if crc_ok else "raise"
        kinds = set(self.cls[changed].tolist())
        if 1 in kinds:
            return "detect"
        return "any" if 2 in kinds else "none"


@pytest.fixture(scope="module")
def fuzz_folder() -> Iterator[str]:
    """Base tables and a scratch folder, for the whole module (hypothesis reuses them)."""
    path = new_store_path(SHM)
    LONG_LIVED.add(path)
    try:
        with embkv.open(path) as s:
            for key_type in ("int64", "str"):
                # one tagged int8 table, one untagged bfloat16 one: every row form the kernels decode
                t = s.create_table(key_type, 4, key_type=key_type, capacity=64, tags=key_type == "int64",
                                   dtype="int8" if key_type == "int64" else "bfloat16")
                long_keys = [f"a-key-longer-than-24-bytes-{i}" for i in range(6)]  # kept in the heap
                ks: list[Any] = list(range(40)) if key_type == "int64" else [f"k{i}" for i in range(34)] + long_keys
                t.put(ks, np.arange(160, dtype=np.float32).reshape(40, 4))
                t.put(ks[:10], -np.arange(40, dtype=np.float32).reshape(10, 4))  # free rows
                t.delete(ks[30:35])  # tombstones
        os.makedirs(os.path.join(path, "scratch"))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        LONG_LIVED.discard(path)


@pytest.fixture(scope="module")
def bases(fuzz_folder: str) -> dict[str, Base]:
    return {kt: Base(os.path.join(fuzz_folder, kt + ".ekv"), kt) for kt in ("int64", "str")}


# ------------------------------------------------------------------ mutations


def _region(base: Base, name: str) -> tuple[int, int]:
    lay = base.layout
    return {
        "header": (0, IMMUTABLE_END), "header_pad": (IMMUTABLE_END, COUNTERS_OFFSET),
        "counters": (COUNTERS_OFFSET, COUNTERS_OFFSET + 64), "header_tail": (COUNTERS_OFFSET + 64, 4096),
        "index": (lay.index_offset, lay.rows_offset), "rows": (lay.rows_offset, lay.freelist_offset),
        "freelist": (lay.freelist_offset, lay.heap_offset),
        "heap": (lay.heap_offset, lay.file_size) if lay.heap_capacity else (lay.index_offset, lay.file_size),
        "anywhere": (0, lay.file_size),
    }[name]


REGIONS = ["header", "header_pad", "counters", "header_tail", "index", "index", "rows", "rows", "rows", "freelist",
           "heap", "anywhere"]
INTERESTING = [0, 1, 2, 3, 4, 16, 64, 4095, 4096, 2**31, 2**32 - 1, 2**32, MAX_CAPACITY, MAX_CAPACITY + 1, 2**40 + 7,
               2**62, 2**63, 2**64 - 1, FORMAT_VERSION + 1]


def mutate(data: st.DataObject, base: Base) -> tuple[bytes, list[str]]:
    buf = bytearray(base.data)
    log = []
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "flip", "flip", "bytes", "field", "truncate", "extend"]))
        if kind == "truncate":
            size = data.draw(st.one_of(st.integers(0, 130), st.integers(0, len(buf))), label="size")
            del buf[size:]
            log.append(f"truncate to {size}")
            continue
        if kind == "extend":
            extra = data.draw(st.binary(min_size=1, max_size=64), label="extra")
            buf += extra
            log.append(f"append {len(extra)} bytes")
            continue
        if kind == "field":
            offset, fmt = data.draw(st.sampled_from(HEADER_FIELDS), label="field")
            limit = 2**32 - 1 if fmt == "<I" else 2**64 - 1
            value = data.draw(st.one_of(st.sampled_from([v for v in INTERESTING if v <= limit]),
                                        st.integers(0, limit)), label="value")
            if len(buf) >= IMMUTABLE_END:
                struct.pack_into(fmt, buf, offset, value)
                struct.pack_into("<I", buf, CRC_OFFSET, zlib.crc32(bytes(buf[:CRC_OFFSET])))
                log.append(f"header field @{offset} = {value} (CRC fixed)")
            continue
        lo, hi = _region(base, data.draw(st.sampled_from(REGIONS), label="region"))
        hi = min(hi, len(buf))
        if hi <= lo:
            continue
        offset = data.draw(st.integers(lo, hi - 1), label="offset")
        if kind == "flip":
            bit = data.draw(st.integers(0, 7), label="bit")
            buf[offset] ^= 1 << bit
            log.append(f"flip bit {bit} @{offset}")
        else:
            run = data.draw(st.binary(min_size=1, max_size=16), label="run")
            buf[offset : offset + len(run)] = run[: max(0, len(buf) - offset)]
            log.append(f"write {run.hex()} @{offset}")
    return bytes(buf), log


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    # pytest-timeout may be using the same timer: give it back what was left of its time afterwards
    old = signal.signal(signal.SIGALRM, on_alarm)
    pending, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, pending - (time.monotonic() - start)))


def _try(fn: Any, *args: Any) -> tuple[bool, Any]:
    """Run an API call: (True, result), or (False, error) for a typed embkv error; anything else raises."""
    try:
        return True, fn(*args)
    except embkv.EmbkvError as exc:
        return False, exc


def _same_content(base: Base, table: embkv.Table) -> bool:
    keys, vectors = table.export()
    got = dict(zip(map(repr, list(keys)), (v.tobytes() for v in vectors), strict=True))
    want = dict(zip(map(repr, list(base.keys)), (v.tobytes() for v in base.vectors), strict=True))
    return got == want


STATS: dict[str, dict[str, Any]] = {
    kt: {"examples": 0, "opened": 0, "refused": 0, "reported": 0, "by_expectation": {}}
    for kt in ("int64", "str")}


def _fuzz_one(folder: str, base: Base, mutated: bytes, log: list[str]) -> None:
    expect = base.expectation(mutated)
    stats = STATS[base.key_type]
    stats["examples"] += 1
    stats["by_expectation"][expect] = stats["by_expectation"].get(expect, 0) + 1
    scratch = os.path.join(folder, "scratch")
    path = os.path.join(scratch, "f.ekv")
    for name in os.listdir(scratch):
        os.unlink(os.path.join(scratch, name))
    with open(path, "wb") as f:
        f.write(mutated)
    probe = list(base.keys[:5]) + ([12345] if base.key_type == "int64" else ["nope"])
    with time_limit(10):
        # read-only first
        opened, table = _try(lambda: embkv.open(scratch, readonly=True)["f"])
        if opened:
            stats["opened"] += 1
            for call in (lambda: table.get(probe), lambda: table.contains(probe), lambda: len(table),
                         table.keys, table.export, table.info):
                _try(call)
            if expect == "none":
                assert _same_content(base, table), log
            table.close()
        else:
            stats["refused"] += 1
        report = check_table(path)
        assert isinstance(report, CheckReport)
        stats["reported"] += not report.ok
        if expect == "raise":
            assert not opened, f"a damaged header or short file was opened: {log}"
            assert report.fatal, (log, str(report))
        elif expect == "detect":
            # a damaged `dirty` counter reads like a writer that died in a batch: a recoverable note
            assert not report.ok or report.notes, f"check missed damage to a live structure: {log}"
        elif expect == "none":
            assert opened and report.ok, (log, str(report))
        if not opened:
            assert report.fatal, (log, str(report))
        # then a writer: recovery, writes and a growth may all run on the damaged file
        ok, store = _try(lambda: embkv.open(scratch, lock_timeout=1))
        assert ok, store
        try:
            ok, writer = _try(lambda: store["f"])
            assert ok == opened or expect != "none", (log, writer)
            if ok:
                new_key: Any = 777_777 if base.key_type == "int64" else "fresh"
                _try(writer.put, [new_key], np.ones((1, writer.dim), dtype=np.float32))
                _try(writer.get, [*probe, new_key])
                _try(writer.delete, probe[:2])
                grow: Any = (np.arange(1000, 1100) if base.key_type == "int64"
                             else [f"g{i}" for i in range(100)])
                _try(writer.put, grow, np.zeros((100, writer.dim), dtype=np.float32))
                _try(writer.get, grow)
        finally:
            store.close()
        check_table(path)


@pytest.mark.parametrize("key_type", ["int64", "str"])
def test_fuzz_damaged_files(fuzz_folder, bases, key_type):
    base = bases[key_type]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @FUZZ
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        mutated, log = mutate(data, base)
        _fuzz_one(fuzz_folder, base, mutated, log)

    fuzz()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    print(f"\n[hostile] {key_type} files: {STATS[key_type]}; max RSS grew {grown / 1024:.0f} MiB")
    assert grown < RSS_LIMIT_KIB


def test_fuzz_mutation_classes_are_all_exercised():
    """The fuzz runs above reached every expectation class (else the classifier is vacuous)."""
    for key_type, stats in STATS.items():
        if stats["examples"] < EXAMPLES:
            pytest.skip("runs after the file fuzzers (run the whole file)")
        assert set(stats["by_expectation"]) == {"raise", "detect", "none", "any"}, (key_type, stats)


# ------------------------------------------------------------------ check names the damage


def _file(folder: str, key_type: str = "int64") -> tuple[str, Layout]:
    with embkv.open(folder) as s:
        t = s.create_table("t", 4, key_type=key_type, capacity=64)
        keys: Any = list(range(1, 41)) if key_type == "int64" else [f"key-{i}" for i in range(40)]
        t.put(keys, np.arange(160, dtype=np.float32).reshape(40, 4))
        path = t.path
    with open(path, "rb") as f:
        return path, Layout.parse(f.read(4096), os.path.getsize(path))


def _live_slot(path: str, lay: Layout, n: int = 0) -> tuple[int, int, int]:
    """(slot index, the word after the row's seq (an int table's key), row) of the n-th live slot."""
    slots = np.fromfile(path, dtype=np.uint64, count=lay.slot_count, offset=lay.index_offset)
    field = slots & np.uint64(ROW_FIELD)
    live = np.flatnonzero((field != 0) & (field != np.uint64(ROW_FIELD)))
    i = int(live[n])
    row = int(field[i]) - 1
    key = np.fromfile(path, dtype=np.int64, count=1, offset=lay.rows_offset + row * lay.row_stride + 8)[0]
    return i, int(key), row


def _set_row_field(path: str, lay: Layout, slot: int, row_field: int) -> None:
    """Point index slot ``slot`` at ``row_field`` (row + 1), keeping its fingerprint."""
    word = int(np.fromfile(path, dtype=np.uint64, count=1, offset=lay.index_offset + 8 * slot)[0])
    _poke(path, lay.index_offset + 8 * slot, struct.pack("<Q", (word & ~ROW_FIELD) | row_field))


def _poke(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _xor(path: str, offset: int, mask: int = 0x01) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        byte = f.read(1)[0]
    _poke(path, offset, bytes([byte ^ mask]))


def _cli_check(path: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_main, ["check", path])
    return result.exit_code, result.output


def test_check_names_a_foreign_file(store_path):
    os.makedirs(store_path)
    path = os.path.join(store_path, "x.ekv")
    with open(path, "wb") as f:
        f.write(b"\x7fELF" + os.urandom(20_000))
    report = check_table(path)
    assert report.fatal and "NotATableError" in str(report)
    code, out = _cli_check(store_path)
    assert code == 1 and "not an embkv table" in out


def test_check_names_a_newer_format_version(store_path):
    path, _ = _file(store_path)
    _poke(path, 8, struct.pack("<I", FORMAT_VERSION + 1))
    with open(path, "rb") as f:
        head = f.read(CRC_OFFSET)
    _poke(path, CRC_OFFSET, struct.pack("<I", zlib.crc32(head)))
    report = check_table(path)
    assert report.fatal and "FormatVersionError" in str(report) and "Upgrade embkv" in str(report)
    with pytest.raises(embkv.FormatVersionError):
        embkv.open(store_path, readonly=True)["t"]


@pytest.mark.parametrize("size", [0, 7, 100, 4096, 8191, -1])
def test_check_names_a_truncated_file(store_path, size):
    path, lay = _file(store_path)
    os.truncate(path, size if size >= 0 else lay.file_size - 1)
    report = check_table(path)
    assert report.fatal, str(report)
    if size > 111:
        assert "TruncatedTableError" in str(report) and "truncated" in str(report)
    with pytest.raises(embkv.EmbkvError):
        embkv.open(store_path, readonly=True)["t"]


@pytest.mark.parametrize("capacity", [2**30, MAX_CAPACITY, MAX_CAPACITY + 1, 2**64 - 1])
def test_check_names_a_huge_claimed_capacity_without_allocating(store_path, capacity):
    path, lay = _file(store_path)
    if capacity <= MAX_CAPACITY:  # a self-consistent header for a huge table: only the size gives it away
        _poke(path, 0, Layout.plan(4, "float32", "int64", capacity).pack_header()[:IMMUTABLE_END])
    else:
        _poke(path, 48, struct.pack("<Q", capacity))
        with open(path, "rb") as f:
            head = f.read(CRC_OFFSET)
        _poke(path, CRC_OFFSET, struct.pack("<I", zlib.crc32(head)))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = check_table(path)
    assert report.fatal and ("TruncatedTableError" in str(report) or "CorruptTableError" in str(report))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 64 * 1024
    assert os.path.getsize(path) == lay.file_size


def test_check_names_a_flipped_vector_byte_and_repair_drops_the_row(store_path):
    path, lay = _file(store_path)
    _, key, row = _live_slot(path, lay)
    _xor(path, lay.rows_offset + row * lay.row_stride + lay.row_header + 5)
    report = check_table(path)
    assert not report.fatal and report.damaged_rows == [row]
    assert any("row checksum mismatch" in p and f"row {row}" in p for p in report.problems), report.problems
    code, out = _cli_check(path)
    assert code == 1 and "checksum mismatch" in out
    result = CliRunner().invoke(cli_main, ["repair", store_path, "t", "--yes"])
    assert result.exit_code == 0 and "dropped 1" in result.output, result.output
    assert check_table(path).ok
    t = embkv.open(store_path, readonly=True)["t"]
    assert len(t) == 39 and not t.contains([key])[0]


@pytest.mark.parametrize("field", ["fingerprint", "row"])
def test_check_names_a_damaged_index_slot(store_path, field):
    path, lay = _file(store_path)
    slot, _, _ = _live_slot(path, lay)
    _xor(path, lay.index_offset + 8 * slot + (6 if field == "fingerprint" else 0), 0x02)
    report = check_table(path)
    assert not report.ok and not report.fatal
    text = " ".join(report.problems)
    assert ("different key" in text or "more than one index slot" in text or "both free and referenced" in text
            or "cannot be found" in text or "rows-used" in text), text


@pytest.mark.parametrize(("at", "problem"), [(8 + 3, "differing from it"),  # in the prefix the row keeps too
                                            (8 + 20, "different key than their index slot")])
def test_check_names_damaged_string_key_bytes(store_path, at, problem):
    with embkv.open(store_path) as s:
        s.create_table("t", 4, key_type="str").put(["k" * 30], np.ones((1, 4), dtype=np.float32))
    path = os.path.join(store_path, "t.ekv")
    with open(path, "rb") as f:
        lay = Layout.parse(f.read(4096), os.path.getsize(path))
    _, _, row = _live_slot(path, lay)
    heap_at = int(np.fromfile(path, dtype=np.uint64, count=1, offset=lay.rows_offset + row * lay.row_stride + 24)[0])
    _xor(path, lay.heap_offset + heap_at + at, 0x20)  # the heap record: u64 length, then the key bytes
    report = check_table(path)
    assert any(problem in p for p in report.problems), report.problems


def test_check_names_a_half_written_row(store_path):
    path, lay = _file(store_path)
    _, _, row = _live_slot(path, lay)
    _xor(path, lay.rows_offset + row * lay.row_stride, 0x01)  # seq odd: a writer stopped mid-row
    assert any("half-written" in p for p in check_table(path).problems)


# ------------------------------------------------------------------ known bugs (src), kept as strict xfails


def test_superseded_flag_in_current_file_does_not_hang(store_path):
    path, _ = _file(store_path)
    _poke(path, SUPERSEDED_BYTES[0], struct.pack("<Q", 1))
    with time_limit(3):
        report = check_table(path)
        t = embkv.open(store_path, readonly=True)["t"]
        with contextlib.suppress(embkv.EmbkvError):
            t.get([1])
    assert not report.ok, "check should name the flag"


def test_index_row_field_beyond_the_row_area_is_reported(store_path):
    """Regression test: before c7e6f91 check converted row numbers to int64, so a slot whose row
    field had the top bit set became a negative row that passed the range test, and numpy
    indexing raised IndexError (check must never raise). Rows are 40-bit fields now; the
    largest one is tested."""
    path, lay = _file(store_path)
    slot, _, _ = _live_slot(path, lay)
    _set_row_field(path, lay, slot, ROW_FIELD - 1)
    report = check_table(path)
    assert any("outside the row area" in p for p in report.problems), report.problems


def test_growth_does_not_launder_a_damaged_index_entry(store_path):
    """Regression test: before c7e6f91 growth (export_live) had the same signed-row blind spot: a
    slot whose row field reads as -3 as int64 was copied from row capacity-3 by numpy's negative
    indexing, so a damaged index entry that lookups refused became, after the next growth, a
    valid-looking row holding another row's bytes, and check then reported the table OK."""
    path, lay = _file(store_path)
    slot, key, _ = _live_slot(path, lay)
    _set_row_field(path, lay, slot, lay.row_capacity + 5)
    t = embkv.open(store_path)["t"]
    with pytest.raises(embkv.CorruptTableError):
        t.get([key])
    with pytest.raises(embkv.CorruptTableError):  # growth refuses to copy a damaged index
        t.put(np.arange(1000, 1100), np.zeros((100, 4), dtype=np.float32))
    with pytest.raises(embkv.CorruptTableError):
        t.get([key])
    assert not check_table(path).ok
    result = CliRunner().invoke(cli_main, ["repair", store_path, "t", "--yes"])
    assert result.exit_code == 0 and "dropped 1" in result.output, result.output
    _, found = t.get([key])
    assert not found[0] and check_table(path).ok


# ------------------------------------------------------------------ the public API, fuzzed

_DTYPES = [np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float16, np.float32, np.float64, np.bool_,
           np.complex64, "U3", "S3", "M8[s]"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                     st.text(max_size=6), st.binary(max_size=6), st.just(float("inf")))
_arrays = hnp.arrays(dtype=st.sampled_from(_DTYPES), shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
                     elements=None)
KEYS = st.one_of(
    _scalars,
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8),
    st.lists(st.integers(0, 6), max_size=8),  # small ints: hits and duplicates
    st.lists(st.text(alphabet="ab\u00e9\ud800", max_size=3), max_size=8),  # incl. lone surrogates
    st.lists(st.one_of(st.text(max_size=3), st.binary(max_size=3)), max_size=6),
    st.lists(_scalars, max_size=5),
    st.recursive(st.integers(0, 6), lambda inner: st.lists(inner, max_size=3), max_leaves=6),
    st.tuples(st.integers(0, 6), st.integers(0, 6)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=3),
    st.sets(st.integers(0, 6), max_size=4),
    _arrays,
    st.integers(0, 6).map(lambda n: np.arange(n, dtype=np.int64)[::-1]),  # non-contiguous? (reversed view)
    st.integers(0, 6).map(lambda n: np.arange(2 * n, dtype=np.int64)[::2]),  # strided view
)
VECTORS = st.one_of(
    _scalars,
    _arrays,
    hnp.arrays(dtype=st.sampled_from([np.float16, np.float32, np.float64]),
               shape=st.tuples(st.integers(0, 8), st.sampled_from([3, 4, 5])),
               elements=st.floats(allow_nan=True, allow_infinity=True, width=16)),
    hnp.arrays(dtype=st.sampled_from([np.float32, np.float64]), shape=st.tuples(st.integers(0, 8), st.just(4)),
               elements=st.floats(-(2.0**100), 2.0**100, width=32)),  # overflows float16 tables to inf
    st.lists(st.lists(st.floats(allow_nan=True), min_size=4, max_size=4), max_size=6),
    st.lists(st.lists(st.integers(-5, 5), max_size=5), max_size=4),  # ragged
)
OPS = st.lists(st.tuples(st.sampled_from(["put", "put", "get", "get_default", "delete", "contains", "in"]),
                         KEYS, VECTORS), min_size=1, max_size=6)


def _content(t: embkv.Table) -> dict[str, bytes]:
    keys, vectors = t.export()
    return {repr(k): v.tobytes() for k, v in zip(list(keys), vectors, strict=True)}


def _api_call(t: embkv.Table, op: str, keys: Any, vectors: Any) -> Any:
    if op == "put":
        return t.put(keys, vectors)
    if op == "get":
        return t.get(keys)
    if op == "get_default":
        return t.get(keys, default=vectors)
    if op == "delete":
        return t.delete(keys)
    if op == "contains":
        return t.contains(keys)
    return keys in t


API_COUNTS = {kt: {"calls": 0, "ok": 0, "typed_errors": 0} for kt in ("int64", "str")}


@pytest.fixture(scope="module")
def api_store() -> Iterator[embkv.Store]:
    path = new_store_path(SHM)
    LONG_LIVED.add(path)
    try:
        with embkv.open(path) as s:
            yield s
    finally:
        shutil.rmtree(path, ignore_errors=True)
        LONG_LIVED.discard(path)


@pytest.mark.parametrize("key_type", ["int64", "str"])
def test_fuzz_public_api(api_store, key_type):
    """Garbage keys and vectors: success or a typed EmbkvError, and a refused call changes nothing;
    a successful put stores exactly what was given (cast to the table's dtype, last duplicate wins)."""
    name = f"api_{key_type}"
    table = api_store.create_table(name, 4, dtype="float16" if key_type == "str" else "float32", key_type=key_type,
                                   capacity=16)

    counts = API_COUNTS[key_type]

    @settings(max_examples=EXAMPLES // 2, deadline=2000, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(OPS)
    def fuzz(ops: list[tuple[str, Any, Any]]) -> None:
        for op, keys, vectors in ops:
            if op == "get_default" and isinstance(vectors, np.ndarray) and vectors.dtype.kind == "c":
                continue  # known: test_complex_default_is_a_schema_error
            before = _content(table)
            counts["calls"] += 1
            # float64 -> float16 overflows to inf, as documented: numpy's cast warning is not an error here
            with time_limit(10), np.errstate(over="ignore", invalid="ignore"):
                try:
                    result = _api_call(table, op, keys, vectors)
                except embkv.EmbkvError:
                    counts["typed_errors"] += 1
                    assert _content(table) == before, f"a refused {op} changed the table"
                    continue
            counts["ok"] += 1
            if op == "put":
                with np.errstate(over="ignore", invalid="ignore"):
                    _check_put(table, keys, vectors)
            elif op == "delete":
                assert isinstance(result, int) and len(before) - len(_content(table)) == result
            else:
                assert _content(table) == before, f"{op} changed the table"
                if op == "get" or op == "get_default":
                    out, found = result
                    assert out.shape == (len(found), 4) and out.dtype == table.dtype
        table.delete(table.keys())  # start each example from an empty table

    fuzz()
    print(f"\n[hostile] public API ({key_type} keys): {counts}")


def _check_put(table: embkv.Table, keys: Any, vectors: Any) -> None:
    out, found = table.get(keys)
    assert found.all()
    if not len(found):
        return  # an empty batch is a no-op whatever the vectors look like (documented)
    want = np.asarray(vectors).astype(table.dtype).reshape(len(found), -1)
    # the last occurrence of a key wins: every occurrence reads back the vector of the last one
    norm = [repr(k.encode() if isinstance(k, str) else k) for k in
            (list(np.asarray(keys).reshape(-1).tolist()) if table.key_type == "int64"
             else ([keys] if isinstance(keys, (str, bytes)) else list(keys)))]
    last = {k: i for i, k in enumerate(norm)}
    expect = want[[last[k] for k in norm]]
    assert np.array_equal(out, expect, equal_nan=True) or np.array_equal(
        out.view(np.uint8), expect.view(np.uint8)), (out, expect)


def test_complex_default_is_a_schema_error(store):
    t = store.create_table("t", 4)
    t.put([1], np.ones((1, 4)))
    with pytest.raises(embkv.SchemaError):
        t.get([2], default=np.array([1 + 2j] * 4))
