"""Verify a table file (``embkv check``) and rebuild what can be saved from a damaged one (``embkv repair``).

The checker trusts nothing in the file: it parses the header through the same validation as
open, then cross-checks the index, the rows (checksums, keys), the free-row stack and the
counters against each other, vectorized where it can be.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from ..errors import EmbkvError
from .format import Counter, Layout
from .kernels import ROW_FIELD, SLOT_EMPTY, SLOT_TOMB, fingerprint, mix64
from .mapping import Mapping, row_int_keys, row_tags, row_vectors, slot_fingerprints, slot_rows
from .publish import TABLE_SUFFIX
from .table import Table

__all__ = ["CheckReport", "check_table", "repair_table"]


@dataclasses.dataclass
class CheckReport:
    """What ``check_table`` found: ``problems`` is empty for a healthy table."""

    path: str
    rows: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # recoverable: the next writer fixes them
    damaged_rows: list[int] = dataclasses.field(default_factory=list)
    fatal: bool = False  # the file cannot be opened at all (header, size, magic)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"{self.path}: OK ({self.rows:,} rows)" if self.ok
                 else f"{self.path}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_MAX_LISTED = 20


def check_table(path: str) -> CheckReport:
    """Check one table file; never raises for a damaged file, reports instead."""
    report = CheckReport(path)
    try:
        m = Mapping(path, writable=False)
    except EmbkvError as exc:
        report.problems.append(f"{type(exc).__name__}: {exc}")
        report.fatal = True
        return report
    try:
        _check_mapping(m, report)
    finally:
        m.close()
    return report


def _check_mapping(m: Mapping, report: CheckReport) -> None:
    lay = m.layout
    c = m.counters
    problems = report.problems
    slots = m.slots()
    srow = slots & ROW_FIELD
    live = (srow != SLOT_EMPTY) & (srow != SLOT_TOMB)
    n_live = int(live.sum())
    n_tomb = int((srow == SLOT_TOMB).sum())
    report.rows = n_live
    # a writer that died inside a batch leaves counters behind the index: the next writable
    # open recounts them and completes the batch from the log, so that is a note, not damage
    counters_lag = report.notes if c[Counter.DIRTY] else problems
    if c[Counter.DIRTY]:
        report.notes.append(f"a writer (pid {int(c[Counter.DIRTY])}) died inside a batch; "
                            "the next writable open completes it from the log")
    if c[Counter.SUPERSEDED]:
        problems.append("the current version is flagged as superseded (readers would keep reopening it)")
    if n_live != int(c[Counter.LIVE]):
        counters_lag.append(f"live-key counter says {int(c[Counter.LIVE])}, the index holds {n_live}")
    if n_tomb != int(c[Counter.TOMBS]):
        counters_lag.append(f"tombstone counter says {int(c[Counter.TOMBS])}, the index holds {n_tomb}")
    slot_idx, rows, in_range = slot_rows(slots, lay.row_capacity)
    out_of_range = ~in_range
    if out_of_range.any():
        problems.append(f"{int(out_of_range.sum())} index slot(s) point outside the row area, "
                        f"e.g. slot {int(slot_idx[out_of_range][0])}")
    ok_rows = rows[~out_of_range]
    ok_slots = slot_idx[~out_of_range]
    uniq, counts = np.unique(ok_rows, return_counts=True)
    if (counts > 1).any():
        problems.append(f"{int((counts > 1).sum())} row(s) referenced by more than one index slot")
    if len(ok_rows) and ok_rows.max() >= int(c[Counter.ROWS_USED]):
        problems.append("index references rows above the rows-used mark")
    bad = m.view.verify_rows(np.ascontiguousarray(ok_rows))
    if bad:
        report.damaged_rows = [r for r, _ in bad]
        kinds: dict[str, int] = {}
        for _, why in bad:
            kinds[why] = kinds.get(why, 0) + 1
        for why, count in kinds.items():
            problems.append(f"{count} row(s): {why}, e.g. row {next(r for r, w in bad if w == why)}")
    intact = ~np.isin(ok_rows, np.asarray(report.damaged_rows, dtype=np.int64))
    keys = _row_keys(m, ok_rows[intact])
    mismatch = slot_fingerprints(slots[ok_slots[intact]]) != fingerprint(_key_hashes(m, keys))
    if mismatch.any():
        problems.append(f"{int(mismatch.sum())} row(s) hold a different key than their index slot, "
                        f"e.g. row {int(ok_rows[intact][mismatch][0])}")
    if _has_duplicate_keys(lay.key_type, keys):
        problems.append("the same key appears in more than one index slot")
    _check_freelist(m, uniq, problems)
    _check_reachable(m, keys, problems)


def _check_freelist(m: Mapping, referenced: np.ndarray, problems: list[str]) -> None:
    nfree = int(m.counters[Counter.FREE])
    free_u = m.freelist()[:nfree]
    above = free_u >= np.uint64(int(m.counters[Counter.ROWS_USED]))
    if above.any():
        problems.append("free-row stack holds rows above the rows-used mark")
    free = free_u[~above].astype(np.int64)
    if len(np.unique(free)) != len(free):
        problems.append("free-row stack lists a row twice")
    both = np.intersect1d(free, referenced)
    if len(both):
        problems.append(f"{len(both)} row(s) are both free and referenced by the index, e.g. row {int(both[0])}")


def _row_keys(m: Mapping, rows: np.ndarray) -> Any:
    """The keys intact ``rows`` hold: int64 array, or packed (hashes, offsets, blob)."""
    if m.layout.key_type == "int64":
        return row_int_keys(m, rows)
    return m.view.export_str(np.ascontiguousarray(rows))


def _has_duplicate_keys(key_type: str, keys: Any) -> bool:
    if key_type == "int64":
        return bool(len(keys)) and len(np.unique(keys)) != len(keys)
    hashes = np.frombuffer(keys[0], dtype=np.uint64)
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    offsets = np.frombuffer(keys[1], dtype=np.uint64).astype(np.int64)
    blob = bytes(keys[2])
    shared = np.flatnonzero(counts[inverse] > 1).tolist()  # equal hashes: compare the bytes
    seen = {blob[offsets[i] : offsets[i + 1]] for i in shared}
    return len(seen) != len(shared)


def _key_hashes(m: Mapping, keys: Any) -> np.ndarray:
    """The hash each key is indexed by (its slot's fingerprint is 24 bits of it)."""
    if m.layout.key_type == "int64":
        return mix64(keys)
    return np.frombuffer(keys[0], dtype=np.uint64)


def _check_reachable(m: Mapping, keys: Any, problems: list[str]) -> None:
    """Every live key must be found by a probe from its home slot (no gap before it)."""
    n = len(keys) if m.layout.key_type == "int64" else len(keys[0]) // 8
    if not n:
        return
    found = np.empty(n, dtype=np.bool_)
    try:
        if m.layout.key_type == "int64":
            m.view.get_int(np.ascontiguousarray(keys), None, found, None)
        else:
            hashes, offsets, blob = keys
            m.view.get_str(hashes, offsets, blob, None, found, None)
    except EmbkvError as exc:
        problems.append(f"lookups fail: {exc}")
        return
    lost = int((~found).sum())
    if lost:
        problems.append(f"{lost} key(s) in the index cannot be found by a lookup (broken probe chain)")


def table_paths(store_path: str, table: str | None = None) -> list[str]:
    if os.path.isfile(store_path):
        return [store_path]
    if table is not None:
        return [os.path.join(store_path, table + TABLE_SUFFIX)]
    return sorted(os.path.join(store_path, e) for e in os.listdir(store_path)
                  if e.endswith(TABLE_SUFFIX) and not e.startswith("."))


def repair_table(table: Table) -> dict[str, Any]:
    """Rebuild ``table`` from its intact rows and publish that as the new version.

    Rows whose checksum or key is damaged, and index slots that point nowhere, are dropped
    (and counted); every intact key keeps its vector. Needs the header to be readable.
    """
    with table.write_session() as session:
        m = session.mapping
        lay = m.layout
        slots = m.slots()
        live_slots, rows, in_range = slot_rows(slots, lay.row_capacity)
        rows, fps = rows[in_range], slot_fingerprints(slots[live_slots[in_range]])
        damaged = {r for r, _ in m.view.verify_rows(np.ascontiguousarray(rows))}
        if damaged:
            intact = ~np.isin(rows, np.fromiter(damaged, dtype=np.int64))
            rows, fps = rows[intact], fps[intact]
        _, first = np.unique(rows, return_index=True)  # one slot per row
        rows, fps = rows[np.sort(first)], fps[np.sort(first)]
        keys = _row_keys(m, rows)
        keep = fps == fingerprint(_key_hashes(m, keys))  # a row holding another key than its slot's
        rows = rows[keep]
        keys = _row_keys(m, rows)
        vectors = row_vectors(m, rows)
        tags = row_tags(m, rows)
        dropped = len(live_slots) - len(rows)
        new_layout = Layout.plan(lay.dim, lay.dtype, lay.key_type, max(lay.row_capacity, len(rows)),
                                 lay.heap_capacity, time.time_ns(), tagged=lay.tagged)
        session.publish(new_layout, iter([(keys, vectors, tags)]) if len(rows) else iter(()))
    return {"kept": len(rows), "dropped": dropped}
