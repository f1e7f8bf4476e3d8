"""Shared fixtures: stores in /dev/shm (and on disk), cleaned after every test and checked.

Every store folder of one pytest session is named ``<dir>/embkv-test-<session>-<uuid>``, with
``<dir>`` /dev/shm (``store_path``) or ``tempfile.gettempdir()`` (``disk_store_path``).
The session id comes from ``EMBKV_TEST_SESSION`` when a parent test runs this suite in a
subprocess (so the parent can check the child's folders too), else it is fresh. The checks
only look at this session's folders: other people may run the suite (or benchmarks, which
name their folders ``embkv-bench-*``, ``embkv-svc-*``) on the same host at the same time, and
their folders are not ours to judge.

After every test (``_resource_hygiene``): no store folder of this session is left behind, no
temp file of ours (``.<name>.ekv.<pid>.<rand>.tmp``) is left in a test's store folder, in
/dev/shm or in the temp folder, and no child process is still running. A test that makes temp
files on purpose (to see them removed) says so with ``@pytest.mark.makes_temp_files``.
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

import embkv
from embkv.testing import poll
from helpers import free_port

SHM = "/dev/shm"
TMP = tempfile.gettempdir()
SESSION = os.environ.get("EMBKV_TEST_SESSION") or uuid.uuid4().hex[:12]
PREFIX = f"embkv-test-{SESSION}-"
TEMP_GLOB = ".*.ekv.*.tmp"  # a version being built (table.temp_path)
# store folders that a module- or session-scoped fixture owns for longer than one test
LONG_LIVED: set[str] = set()


def session_leftovers(session: str = SESSION) -> list[str]:
    return sorted(p for folder in (SHM, TMP) for p in glob.glob(os.path.join(folder, f"embkv-test-{session}-*")))


def new_store_path(folder: str = SHM) -> str:
    """A fresh, not yet existing store folder of this session under ``folder``."""
    path = os.path.join(folder, PREFIX + uuid.uuid4().hex)
    assert not os.path.exists(path)
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "makes_temp_files: the test leaves temp-named files on purpose")


def _ours(folder: str) -> set[str]:
    """Entries of ``folder`` that embkv or this session's tests made: our store folders, temp files."""
    found = set(glob.glob(os.path.join(folder, PREFIX + "*")))
    found.update(glob.glob(os.path.join(folder, TEMP_GLOB)))
    return found


def _running_children() -> list[psutil.Process]:
    multiprocessing.active_children()  # reaps finished multiprocessing children
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(_cmdline(p)):
                continue
        except psutil.Error:
            continue
        out.append(p)
    return out


@pytest.fixture(autouse=True)
def _resource_hygiene() -> Iterator[None]:
    """After the test (and its fixtures' teardown): nothing of ours left, no child running.

    Autouse fixtures are set up first, so this one is torn down after the test's store fixtures
    removed their folders. Only this session's names count (see the module docstring): a bare
    ``embkv-*`` glob would blame us for the benchmark folders other people create meanwhile.
    """
    before = {folder: _ours(folder) for folder in (SHM, TMP)}
    yield
    problems = []
    for folder in (SHM, TMP):
        new = sorted(_ours(folder) - before[folder] - LONG_LIVED)
        if new:
            problems.append(f"left in {folder}: {new}")
            for path in new:  # clean up, so one leak is not blamed on the tests after it
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
    children = _running_children()
    if children:
        problems.append(f"child processes still running: {children}")
        for p in children:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert not problems, "; ".join(problems)


def _remove_store(request: pytest.FixtureRequest, path: str) -> None:
    """Remove a test's store folder; temp files of dead builders in it are a leak."""
    temps = sorted(glob.glob(os.path.join(path, TEMP_GLOB)))
    shutil.rmtree(path, ignore_errors=True)
    if temps and not request.node.get_closest_marker("makes_temp_files"):
        raise AssertionError(f"temp files left in the store folder: {temps}")


@pytest.fixture(autouse=True, scope="session")
def _nothing_left_in_shm() -> Iterator[None]:
    """At the end of the session no store folder of ours remains and no child process runs."""
    yield
    leftovers = session_leftovers()
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    # multiprocessing's resource tracker is a helper that lives as long as this interpreter
    children = [p for p in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(_cmdline(p))]
    assert not leftovers, f"store folders left in {SHM}: {leftovers}"
    assert not children, f"child processes still running: {children}"


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.fixture
def store_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, not yet existing folder under /dev/shm; removed (with its content) after the test."""
    path = new_store_path(SHM)
    try:
        yield path
    finally:
        _remove_store(request, path)


@pytest.fixture
def disk_store_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, not yet existing folder in the temp folder (a disk path: durable store, WAL synced)."""
    path = new_store_path(TMP)
    try:
        yield path
    finally:
        _remove_store(request, path)


@pytest.fixture
def store(store_path: str) -> Iterator[embkv.Store]:
    s = embkv.open(store_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real redis-server on a free local port, without persistence; stopped after the test."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH: the Redis Streams queue tests need a real server")
    pytest.importorskip("redis", reason="redis-py is not installed (pip install embkv[redis])")
    import redis

    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                assert proc.poll() is None, "redis-server exited"
                return False

        poll(up, 10, "redis-server to answer")
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
