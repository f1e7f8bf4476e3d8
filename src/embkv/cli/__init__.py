"""The `embkv` command line: create, load, info, get, export, drop, worker, and the demo."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import click
import numpy as np

import embkv
from embkv.errors import EmbkvError
from embkv.file.format import DTypeName, KeyType


class _Group(click.Group):
    """Turn embkv's typed errors into a one-line message and exit status 1 instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (EmbkvError, FileNotFoundError, PermissionError) as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(embkv.__version__, prog_name="embkv")
def main() -> None:
    """embkv: an embedding store shared by every worker process on a host.

    STORE is a folder of tables: under /dev/shm it lives in memory (fast, gone at reboot),
    on a disk path it is durable and may be larger than RAM.

    \b
    Try:  embkv demo            (1M x 64 table, 4 workers, vs a dict copy per worker)
          embkv create /dev/shm/shop items --dim 64
          embkv load /dev/shm/shop items keys.npy vectors.npy
          embkv get /dev/shm/shop items 42 43
    """


@main.command()
@click.argument("store")
@click.argument("table")
@click.option("--dim", type=click.IntRange(1), required=True, help="Vector width.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "float64"]), default="float32",
              show_default=True)
@click.option("--key-type", type=click.Choice(["int64", "str"]), default="int64", show_default=True)
@click.option("--capacity", type=click.IntRange(16), default=1024, show_default=True,
              help="Starting size in rows; tables grow on their own.")
def create(store: str, table: str, dim: int, dtype: DTypeName, key_type: KeyType, capacity: int) -> None:
    """Create an empty TABLE in STORE."""
    t = embkv.open(store).create_table(table, dim=dim, dtype=dtype, key_type=key_type, capacity=capacity)
    click.echo(f"created {t!r}")


@main.command()
@click.argument("store")
@click.argument("table")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("vectors", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--key-column", default="key", show_default=True, help="Parquet: column holding keys.")
@click.option("--vector-column", default="vector", show_default=True, help="Parquet: list column of vectors.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "float64"]), default=None,
              help="Stored dtype of a new table (default: the data's float type, else float32).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def load(store: str, table: str, source: str, vectors: str | None, key_column: str, vector_column: str,
         dtype: DTypeName | None, quiet: bool) -> None:
    """Build a new version of TABLE from files and publish it atomically.

    \b
    SOURCE VECTORS   two .npy files: keys [N] (integers or strings) and vectors [N, dim]
    SOURCE.npz       arrays named 'keys' and 'vectors' (what `embkv export` writes)
    SOURCE.parquet   a keys column and a list column of vectors (needs pyarrow)

    Open readers switch to the new version on their next lookup.
    """
    from tqdm import tqdm

    keys: Any = source
    vecs: Any = vectors
    if source.endswith(".npz"):
        with np.load(source, allow_pickle=False) as npz:
            keys, vecs = npz["keys"], npz["vectors"]
    elif vectors is None and not source.endswith((".parquet", ".pq")):
        raise click.UsageError("give a VECTORS .npy file, or a .npz / .parquet SOURCE")
    total = None
    if vecs is not None:
        total = len(np.load(vecs, mmap_mode="r")) if isinstance(vecs, str) else len(vecs)
    with tqdm(total=total, unit="rows", unit_scale=True, disable=quiet, desc=f"loading {table}") as bar:
        t = embkv.open(store).load_table(table, keys, vecs, key_column=key_column, vector_column=vector_column,
                                         dtype=dtype, progress=bar.update)
    click.echo(f"published {t!r}")


@main.command()
@click.argument("store")
@click.argument("table", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(store: str, table: str | None, as_json: bool) -> None:
    """Describe STORE's tables, or one TABLE in detail."""
    s = embkv.open(store, readonly=True)
    names = [table] if table else s.list_tables()
    infos = [s[name].info() for name in names]
    if as_json:
        click.echo(json.dumps(infos if table is None else infos[0], indent=2))
        return
    if not infos:
        click.echo(f"{store}: no tables")
    for i in infos:
        click.echo(f"{i['name']}: {i['rows']:,} rows x {i['dim']} {i['dtype']}, {i['key_type']} keys")
        if table:
            for k, v in i.items():
                click.echo(f"  {k:<16}{v}")


@main.command(context_settings={"ignore_unknown_options": True})  # negative int keys are not options
@click.argument("store")
@click.argument("table")
@click.argument("keys", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print {key: vector or null} as JSON.")
def get(store: str, table: str, keys: tuple[str, ...], as_json: bool) -> None:
    """Print the vectors of KEYS in TABLE (integers for int64 tables)."""
    t = embkv.open(store, readonly=True)[table]
    lookup: Any = list(keys)
    if t.key_type == "int64":
        try:
            lookup = np.array([int(k) for k in keys], dtype=np.int64)
        except ValueError:
            raise click.BadParameter("this table has int64 keys", param_hint="KEYS") from None
    vectors, found = t.get(lookup)
    if as_json:
        click.echo(json.dumps({k: (v.tolist() if f else None) for k, v, f in zip(keys, vectors, found, strict=True)}))
        return
    with np.printoptions(precision=4, suppress=True, linewidth=120, threshold=20):
        for k, v, f in zip(keys, vectors, found, strict=True):
            click.echo(f"{k}: {v}" if f else f"{k}: (missing)")
    if not found.all():
        sys.exit(2)


@main.command()
@click.argument("store")
@click.argument("table")
@click.argument("out", type=click.Path(dir_okay=False))
def export(store: str, table: str, out: str) -> None:
    """Write TABLE's keys and vectors to OUT (.npz, or .parquet with pyarrow)."""
    t = embkv.open(store, readonly=True)[table]
    keys, vectors = t.export()
    tmp = out + ".partial"
    if out.endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = pa.array(vectors.reshape(-1))
        col = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        pq.write_table(pa.table({"key": pa.array(keys), "vector": col}), tmp)
    else:
        if not out.endswith(".npz"):
            raise click.BadParameter("OUT must end in .npz or .parquet", param_hint="OUT")
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.asarray(keys), vectors=vectors)
    os.replace(tmp, out)
    click.echo(f"wrote {len(vectors):,} rows to {out}")


@main.command()
@click.argument("store")
@click.argument("table")
@click.argument("dest")
@click.option("--as", "dest_name", default=None, help="Name in DEST (default: TABLE).")
def copy(store: str, table: str, dest: str, dest_name: str | None) -> None:
    """Copy TABLE into the store DEST: snapshot /dev/shm to disk, or restore disk to /dev/shm.

    Readers on both sides keep reading; readers of DEST switch to the copy on their next call.
    """
    t = embkv.open(store).copy_table(table, dest, dest_name)
    click.echo(f"copied to {t.path}: {t!r}")


@main.command()
@click.argument("store", type=click.Path(exists=True))
@click.argument("table", required=False)
def check(store: str, table: str | None) -> None:
    """Verify tables: header, index, row checksums, free rows, counters.

    STORE may be a store folder (all tables, or TABLE) or one .ekv file. Exits 1 if any
    problem is found, and names it.
    """
    from embkv.file.check import check_table, table_paths

    failed = False
    paths = table_paths(store, table)
    if not paths:
        click.echo(f"{store}: no tables")
    for path in paths:
        report = check_table(path)
        click.echo(str(report))
        failed |= not report.ok
    if failed:
        sys.exit(1)


@main.command()
@click.argument("store")
@click.argument("table")
@click.option("--yes", is_flag=True, help="Do not ask before dropping damaged rows.")
def repair(store: str, table: str, yes: bool) -> None:
    """Rebuild TABLE from its intact rows, dropping damaged ones, and publish it.

    A table whose header is damaged cannot be repaired: restore it from a snapshot.
    """
    from embkv.file.check import check_table, repair_table

    s = embkv.open(store)
    before = check_table(s[table].path)
    click.echo(str(before))
    if before.ok:
        return
    if not yes:
        click.confirm(f"drop {len(before.damaged_rows)} damaged row(s) and rebuild?", abort=True)
    result = repair_table(s[table])
    click.echo(f"rebuilt: kept {result['kept']:,} rows, dropped {result['dropped']:,}")
    click.echo(str(check_table(s[table].path)))


@main.command()
@click.argument("store")
@click.argument("table")
@click.confirmation_option(prompt="Delete the table and its data?")
def drop(store: str, table: str) -> None:
    """Delete TABLE from STORE."""
    embkv.open(store).drop_table(table)
    click.echo(f"dropped {table}")


@main.command()
@click.argument("store")
@click.argument("table")
@click.option("--compute", "compute", required=True, metavar="MODULE:FUNCTION",
              help="Function called with a list of keys, returning a [len(keys), dim] array.")
@click.option("--queue", default="sqlite", show_default=True, help="'sqlite' (a file beside the store) or a "
              "redis:// URL (a stream named TABLE).")
@click.option("--batch", type=click.IntRange(1), default=64, show_default=True, help="Keys per compute call.")
@click.option("--model-version", type=int, default=1, show_default=True,
              help="Version stamped on the vectors written (caches treat older versions as stale).")
@click.option("--lease", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds a claimed batch is ours before another worker may take it over.")
@click.option("--max-attempts", type=click.IntRange(1), default=5, show_default=True)
@click.option("--backoff", type=click.FloatRange(0.0), default=1.0, show_default=True,
              help="Seconds before the first retry of a failed key (doubled per failure).")
@click.option("--until-idle", is_flag=True, help="Exit when no key is ready instead of waiting for more.")
def worker(store: str, table: str, compute: str, queue: str, batch: int, model_version: int, lease: float,
           max_attempts: int, backoff: float, until_idle: bool) -> None:
    """Compute the queued keys of TABLE and write their vectors (compute on miss).

    Runs until SIGINT/SIGTERM (the current batch is finished first). A worker killed
    mid-batch loses nothing: its keys go to another worker when the lease runs out.
    """
    import signal

    from embkv.compute.worker import Worker, open_queue

    s = embkv.open(store)
    q = open_queue(queue, s, table, max_attempts=max_attempts, backoff=backoff)
    w = Worker(s, table, compute, q, model_version=model_version, batch=batch, lease_seconds=lease)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: w.stop())
    click.echo(f"worker on {s[table]!r}, queue {q!r}, batch {batch}, model version {model_version}", err=True)
    w.run(until_idle=until_idle)
    q.close()
    m = w.metrics()
    click.echo(f"computed {m.computed}, failed {m.failed} (gave up {m.gave_up}), batches {m.batches}", err=True)
    s.close()


@main.command("queue")
@click.argument("store")
@click.argument("table")
@click.option("--queue", "queue_spec", default="sqlite", show_default=True,
              help="'sqlite' (the file beside the store) or a redis:// URL (a stream named TABLE).")
@click.option("--failures", "show_failures", is_flag=True, help="List the keys whose computation failed.")
@click.option("--retry-failed", is_flag=True, help="Queue the given-up keys again (attempts reset).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def queue_cmd(store: str, table: str, queue_spec: str, show_failures: bool, retry_failed: bool,
              as_json: bool) -> None:
    """Show the compute-on-miss queue of TABLE: depth, failures, and the metrics every cache
    process and worker shares (hit rate, OOV served, compute time, time from first miss to fill).
    """
    from embkv.compute.worker import open_queue
    from embkv.metrics import SharedMetrics

    s = embkv.open(store, readonly=True)
    try:
        q = open_queue(queue_spec, s, table)
    except embkv.QueueUnavailableError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        retried = q.retry_failed() if retry_failed else None
        depth, failures, shared = q.depth(), q.failures(), SharedMetrics.from_counters(q.counters())
    except embkv.QueueUnavailableError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        q.close()
        s.close()
    gave_up = sum(f.gave_up for f in failures.values())
    report: dict[str, Any] = {
        "table": table, "queue": repr(q), "depth": depth, "failing": len(failures) - gave_up, "gave_up": gave_up,
        "lookups": shared.lookups, "keys": shared.keys, "hits": shared.hits, "hit_rate": round(shared.hit_rate, 4),
        "oov_served": shared.oov_served, "stale_served": shared.stale_served, "enqueued": shared.enqueued,
        "computed": shared.computed, "failed": shared.failed,
        "fill_seconds": None if shared.fill is None else dataclasses.asdict(shared.fill),
        "compute_seconds": None if shared.compute is None else dataclasses.asdict(shared.compute),
    }
    if retried is not None:
        report["retried"] = retried
    if show_failures:
        report["failures"] = {str(k): dataclasses.asdict(f) for k, f in failures.items()}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for name, value in report.items():
        if name == "failures":
            continue
        if isinstance(value, dict):
            value = (f"n={value['count']} mean={value['mean']:.3f} s p50<={value['p50']:g} s "
                     f"p99<={value['p99']:g} s")
        click.echo(f"{name:>16}: {value}")
    if show_failures:
        for key, f in failures.items():
            click.echo(f"{key!r}: {'gave up' if f.gave_up else 'retrying'} after {f.attempts} attempt(s): {f.error}")


@main.command()
@click.option("--rows", type=click.IntRange(1000), default=1_000_000, show_default=True)
@click.option("--dim", type=click.IntRange(1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=256, show_default=True, help="Keys per lookup.")
@click.option("--seconds", type=click.FloatRange(0.1), default=3.0, show_default=True,
              help="Serving time per approach.")
@click.option("--no-dict", is_flag=True, help="Skip the dict-copy-per-worker comparison.")
@click.option("--json", "as_json", is_flag=True, help="Also print the figures as JSON.")
def demo(rows: int, dim: int, workers: int, batch: int, seconds: float, no_dict: bool, as_json: bool) -> None:
    """Serve a shared table to worker processes; compare with a dict copy per worker.

    Builds a ROWS x DIM table in /dev/shm, runs WORKERS processes answering Zipf(1.05)
    batches with 1% misses, prints latency per batch and PSS per worker, and cleans up.
    """
    from embkv.cli.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(rows=rows, dim=dim, workers=workers, batch=batch, seconds=seconds,
                                 compare_dict=not no_dict), echo=click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2))
