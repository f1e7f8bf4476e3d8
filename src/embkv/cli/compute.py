"""`embkv` commands of compute on miss: `worker` (compute queued keys) and `queue` (inspect a queue)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

import embkv

__all__ = ["COMMANDS"]


@click.command()
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


@click.command("queue")
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


COMMANDS = [worker, queue_cmd]
