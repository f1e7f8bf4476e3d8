"""Shared fixtures: stores in /dev/shm, cleaned after every test and checked at session end.

Every store folder of one pytest session is named ``/dev/shm/embkv-test-<session>-<uuid>``.
The session id comes from ``EMBKV_TEST_SESSION`` when a parent test runs this suite in a
subprocess (so the parent can check the child's folders too), else it is fresh. The session
check only looks at this session's folders: other people may run the suite on the same host
at the same time, and their folders are not ours to judge.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

import embkv

SHM = "/dev/shm"
SESSION = os.environ.get("EMBKV_TEST_SESSION") or uuid.uuid4().hex[:12]
PREFIX = f"embkv-test-{SESSION}-"


def session_leftovers(session: str = SESSION) -> list[str]:
    return sorted(glob.glob(os.path.join(SHM, f"embkv-test-{session}-*")))


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
def store_path() -> Iterator[str]:
    """A fresh, not yet existing folder under /dev/shm; removed (with its content) after the test."""
    path = os.path.join(SHM, PREFIX + uuid.uuid4().hex)
    assert not os.path.exists(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
