"""Server processes the benchmarks start and stop: redis-server (TCP, and a unix socket on request),
memcached and uvicorn, each on a free port on 127.0.0.1 (never another interface).

Every process is started with :func:`spawn`: stdin closed, its output appended to a log file in the
benchmark's scratch folder, and SIGTERM sent to it by the kernel if the benchmark dies, even by
SIGKILL. :func:`stop` ends it (SIGTERM, then SIGKILL). Start-up waits raise ``BenchError`` with the
tail of the log when a process exits early or is not ready in time.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from _common import BenchError

HOST = "127.0.0.1"  # every server binds to loopback only
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _set_pdeathsig() -> None:
    """The child gets SIGTERM if we die, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdin closed and stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as fh:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_set_pdeathsig)


def stop(proc: subprocess.Popen[bytes], extra_pids: Sequence[int] = (), timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL: ``proc`` and the listed pids (which it started), nothing else."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pid in extra_pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            p.terminate()
            p.wait(5)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_until(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes],
               log_path: Path) -> None:
    """Poll ``cond`` until it holds; BenchError if ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise BenchError(f"{what}: process exited with {proc.returncode}\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f} s\n{tail(log_path)}")
        time.sleep(0.05)


def answers(probe: Callable[[], object], errors: tuple[type[BaseException], ...] = (OSError,)) -> bool:
    """Whether ``probe()`` returns without one of ``errors`` (a readiness check)."""
    with contextlib.suppress(*errors):
        probe()
        return True
    return False


# ---------------------------------------------------------------------------- key-value servers


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    unix_socket: str | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def address(self) -> str:
        """``host:port`` of its TCP listener."""
        return f"{HOST}:{self.port}"

    def stop(self) -> None:
        stop(self.proc)


def _start(name: str, cmd: list[str], port: int, log_path: Path, ready: Callable[[], bool],
           unix_socket: str | None = None) -> Server:
    server = Server(name, spawn(cmd, log_path), port, log_path, unix_socket)
    try:
        wait_until(ready, READY_TIMEOUT_S, name, server.proc, log_path)
    except BaseException:
        server.stop()
        raise
    return server


def start_redis(folder: Path, unix_socket: bool = False) -> Server:
    """redis-server on a free loopback port (and ``folder/redis.sock`` if ``unix_socket``): no
    persistence, log in ``folder/redis.log``."""
    import redis

    port = free_port()
    sock = str(folder / "redis.sock") if unix_socket else None
    cmd = ["redis-server", "--port", str(port), "--bind", HOST]
    if sock is not None:
        cmd += ["--unixsocket", sock, "--unixsocketperm", "700"]
    cmd += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(folder), "--logfile", ""]
    client = redis.Redis(host=HOST, port=port)
    try:
        return _start("redis-server", cmd, port, folder / "redis.log",
                      lambda: answers(client.ping, (redis.ConnectionError, OSError)), sock)
    finally:
        client.close()


def memcached_cmd(port: int, options: Sequence[str]) -> list[str]:
    """memcached on loopback ``port`` with ``options`` (memory, threads, item size...)."""
    cmd = ["memcached", "-p", str(port), "-l", HOST, *options]
    if os.geteuid() == 0:
        cmd += ["-u", "root"]  # memcached refuses to run as root unless told which user to be
    return cmd


def start_memcached(folder: Path, options: Sequence[str]) -> Server:
    """memcached on a free loopback port, started as :func:`memcached_cmd`; log in ``folder/memcached.log``."""
    from pymemcache.client.base import Client

    port = free_port()

    def version() -> None:
        c = Client((HOST, port), connect_timeout=1, timeout=1)
        try:
            c.version()
        finally:
            c.close()

    return _start("memcached", memcached_cmd(port, options), port, folder / "memcached.log",
                  lambda: answers(version))


# ---------------------------------------------------------------------------- uvicorn


def uvicorn_cmd(app: str, app_dir: Path, port: int, workers: int, extra: Sequence[str] = ()) -> list[str]:
    """``python -m uvicorn app`` on loopback ``port`` with ``workers`` workers, warnings only, no access log."""
    return [sys.executable, "-m", "uvicorn", app, "--app-dir", str(app_dir), "--host", HOST, "--port", str(port),
            "--workers", str(workers), "--log-level", "warning", "--no-access-log",
            "--timeout-graceful-shutdown", "5", *extra]


def http_ok(port: int, path: str) -> bool:
    """Whether ``GET path`` on loopback ``port`` answers 200."""
    import http.client  # here: the lookup benchmark's client processes import this module, and their PSS counts

    with contextlib.suppress(OSError):
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == 200
        finally:
            conn.close()
    return False
