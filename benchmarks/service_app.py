"""The ASGI app of the service benchmark (see bench_service.py): a small inference endpoint.

``GET /score?k=KEY,KEY,...`` names up to 1,000 int64 item keys (the benchmark sends 100). The handler looks up
their vectors in the backend chosen by ``EMBKV_SVC_BACKEND``, scores the ones found (dot product
with a fixed query vector), and answers the top 10 as JSON::

    {"ids": [int, ...], "scores": [float, ...], "found": int, "worker": pid}

Run by ``bench_service.py`` as ``uvicorn service_app:app --app-dir benchmarks --workers W
--http service_app:NoDelayHTTPProtocol`` (see :class:`NoDelayHTTPProtocol` for why).
Every worker builds its own backend at startup (lifespan), then writes an empty file named by
its pid into ``EMBKV_SVC_READY_DIR`` so the benchmark knows all workers are serving.

Backends (environment, all set by the benchmark):

- ``embkv``: the shared table ``EMBKV_SVC_TABLE`` of store ``EMBKV_SVC_STORE``, opened read-only.
- ``redis``: ``MGET`` of raw float32 bytes keyed by the decimal key, from ``EMBKV_SVC_REDIS`` (host:port).
- ``memcached``: pymemcache ``get_many``, same keys and values, from ``EMBKV_SVC_MEMCACHED`` (host:port).
- ``dict``: a private copy per worker, loaded at startup from ``EMBKV_SVC_DATA``/keys.npy and
  vectors.npy: a ``dict`` from key to row plus a numpy matrix of the rows.

The Redis, Memcached and dict clients are the benchmarks' peers (``_peers``: ``RedisPeer``,
``MemcachedPeer``, ``IndexDict``). Redis and Memcached are the synchronous clients, called inside
the async handler: each worker serves one request at a time and blocks on the loopback round trip
(the lowest overhead these clients have; their asyncio variants cost more Python per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from _common import BoolArray, FloatArray, IntArray, malloc_trim
from _peers import IndexDict, MemcachedPeer, RedisPeer

ENV_BACKEND = "EMBKV_SVC_BACKEND"
ENV_STORE = "EMBKV_SVC_STORE"
ENV_TABLE = "EMBKV_SVC_TABLE"
ENV_DATA = "EMBKV_SVC_DATA"
ENV_REDIS = "EMBKV_SVC_REDIS"
ENV_MEMCACHED = "EMBKV_SVC_MEMCACHED"
ENV_DIM = "EMBKV_SVC_DIM"
ENV_SEED = "EMBKV_SVC_QUERY_SEED"
ENV_READY = "EMBKV_SVC_READY_DIR"
ENV_SPREAD_MS = "EMBKV_SVC_SPREAD_ACCEPTS_MS"

BACKENDS = ("embkv", "redis", "memcached", "dict")
TOP_K = 10
MAX_KEYS = 1000

def query_vector(dim: int, seed: int) -> FloatArray:
    """The fixed query vector every worker scores against (the benchmark computes the truth with it)."""
    return np.random.default_rng(seed).standard_normal(dim, dtype=np.float32)


def parse_keys(raw: bytes) -> IntArray:
    """``b"1,2,3"`` -> int64 array; ValueError if the text is not a comma list of integers."""
    if not raw:
        return np.empty(0, dtype=np.int64)
    text = raw.decode("ascii")
    keys = np.fromstring(text, dtype=np.int64, sep=",")  # text mode: exact for int64, fast
    if len(keys) != text.count(",") + 1:
        raise ValueError("keys must be a comma-separated list of integers")
    return keys


class Backend(Protocol):
    name: str

    def lookup(self, raw: bytes) -> tuple[IntArray, FloatArray]:
        """Keys named in ``raw`` (comma list) -> (keys found, their vectors [found, dim] float32)."""
        ...


class EmbkvBackend:
    name = "embkv"

    def __init__(self, store_path: str, table: str) -> None:
        import embkv

        self.table = embkv.open(store_path, readonly=True)[table]

    def lookup(self, raw: bytes) -> tuple[IntArray, FloatArray]:
        keys = parse_keys(raw)
        vectors, found = self.table.get(keys)
        if found.all():
            return keys, vectors
        return keys[found], vectors[found]


def _only_found(keys: IntArray, vectors: FloatArray, found: BoolArray | None) -> tuple[IntArray, FloatArray]:
    return (keys if found is None else keys[found]), vectors


class DictBackend:
    name = "dict"

    def __init__(self, data_dir: str) -> None:
        self.hits = IndexDict(Path(data_dir)).hits

    def lookup(self, raw: bytes) -> tuple[IntArray, FloatArray]:
        keys = parse_keys(raw)
        return _only_found(keys, *self.hits(keys))


class ServerBackend:
    """Redis or Memcached: the request's decimal keys are the names the server holds the rows by."""

    def __init__(self, name: str, peer: RedisPeer | MemcachedPeer) -> None:
        self.name = name
        self.hits = peer.hits

    def lookup(self, raw: bytes) -> tuple[IntArray, FloatArray]:
        vectors, found = self.hits(raw.split(b",") if raw else [])
        return _only_found(parse_keys(raw), vectors, found)


def make_backend(name: str) -> Backend:
    dim = int(os.environ.get(ENV_DIM, "64"))
    if name == "embkv":
        return EmbkvBackend(os.environ[ENV_STORE], os.environ.get(ENV_TABLE, "items"))
    if name == "dict":
        return DictBackend(os.environ[ENV_DATA])
    if name == "redis":
        return ServerBackend(name, RedisPeer(os.environ[ENV_REDIS], dim, socket_keepalive=True))
    if name == "memcached":
        return ServerBackend(name, MemcachedPeer(os.environ[ENV_MEMCACHED], dim))
    raise SystemExit(f"{ENV_BACKEND} must be one of {BACKENDS}, got {name!r}")


def top_k(keys: IntArray, vectors: FloatArray, query: FloatArray, k: int = TOP_K) -> tuple[list[int], list[float]]:
    """Highest dot products first; ties keep request order."""
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return keys[order].tolist(), scores[order].tolist()


class Service:
    """Per-worker state, filled in by the lifespan handler."""

    backend: Backend | None = None
    query: FloatArray = np.zeros(0, dtype=np.float32)
    pid: int = 0


STATE = Service()


async def score(request: Request) -> Response:
    backend = STATE.backend
    if backend is None:
        return JSONResponse({"error": "not ready"}, status_code=503)
    qs: bytes = request.scope["query_string"]
    if not qs.startswith(b"k="):
        return JSONResponse({"error": "expected ?k=KEY,KEY,..."}, status_code=400)
    raw = qs[2:]
    if raw.count(b",") >= MAX_KEYS:
        return JSONResponse({"error": f"at most {MAX_KEYS} keys"}, status_code=400)
    try:
        keys, vectors = backend.lookup(raw)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    ids, scores = top_k(keys, vectors, STATE.query)
    body = json.dumps({"ids": ids, "scores": scores, "found": len(keys), "worker": STATE.pid},
                      separators=(",", ":"))
    return Response(body, media_type="application/json")


async def health(request: Request) -> Response:
    name = STATE.backend.name if STATE.backend is not None else None
    return JSONResponse({"backend": name, "worker": STATE.pid})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    STATE.pid = os.getpid()
    STATE.query = query_vector(int(os.environ.get(ENV_DIM, "64")), int(os.environ.get(ENV_SEED, "0")))
    STATE.backend = make_backend(os.environ.get(ENV_BACKEND, "embkv"))
    gc.collect()
    malloc_trim()  # PSS should show what a worker holds, not its startup peak
    ready = os.environ.get(ENV_READY)
    if ready:
        Path(ready, str(STATE.pid)).touch()
    yield
    STATE.backend = None


class NoDelayHTTPProtocol(AutoHTTPProtocol):  # type: ignore[valid-type,misc]
    """uvicorn's HTTP protocol, plus TCP_NODELAY on every accepted connection.

    With ``--workers N`` uvicorn binds the listening socket itself with ``proto=0``; asyncio then
    skips TCP_NODELAY on accepted sockets (it checks ``proto == IPPROTO_TCP``), and since a response
    goes out as two writes (headers, body), every keep-alive request after the first waits ~40 ms
    for the client's delayed ACK (uvicorn issue #3149). Pass ``--http service_app:NoDelayHTTPProtocol``.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def spread_accepts(pause_s: float) -> None:
    """Make this process's asyncio loops take one connection at a time from a shared listening socket.

    asyncio accepts up to ``backlog`` queued connections each time the listener is readable, so when a
    load generator opens all its keep-alive connections at once, the first uvicorn worker to wake takes
    all of them and the other workers idle for the whole run (on a 2-core host the workers that are
    not on a CPU at that instant never get a connection). Here a worker accepts one connection, then
    stops watching the listener for ``pause_s`` so the other workers take theirs: the connections end
    up spread round-robin, as they would be with clients that arrive over time.
    """
    from asyncio import selector_events

    cls: Any = selector_events.BaseSelectorEventLoop  # _accept_connection is private: untyped
    original = cls._accept_connection
    if getattr(original, "_spread", False):
        return

    def accept_spread(self: Any, protocol_factory: Any, sock: socket.socket, sslcontext: Any = None,
                      server: Any = None, backlog: int = 100, *args: Any) -> None:
        original(self, protocol_factory, sock, sslcontext, server, 1, *args)
        fd = sock.fileno()
        if fd < 0 or not self._remove_reader(fd):
            return  # closed, or asyncio itself stopped watching it (out of file descriptors)

        def resume() -> None:
            if sock.fileno() == fd and (server is None or server.is_serving()):
                self._add_reader(fd, self._accept_connection, protocol_factory, sock, sslcontext, server,
                                 backlog, *args)

        self.call_later(pause_s, resume)

    accept_spread._spread = True  # type: ignore[attr-defined]
    cls._accept_connection = accept_spread


_spread_ms = float(os.environ.get(ENV_SPREAD_MS, "0") or 0)
if _spread_ms > 0:
    spread_accepts(_spread_ms / 1000)

app = Starlette(routes=[Route("/score", score), Route("/health", health)], lifespan=lifespan)
