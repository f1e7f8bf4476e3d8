"""The numpy fallback kernel: same behaviour and same files as the C kernel.

The C kernel serves this process; the fallback runs in subprocesses with EMBKV_KERNEL=numpy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest

import embkv
from conftest import session_leftovers
from helpers import check_vectors, encode

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # helpers.py, conftest.py
ROOT = os.path.dirname(TESTS)


def numpy_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, EMBKV_KERNEL="numpy", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH", "")) if p)
    return env


def run_numpy(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=numpy_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_c_kernel_is_in_use():
    if os.environ.get("EMBKV_KERNEL", "").lower() == "numpy":
        pytest.skip("this session runs the numpy kernel on purpose")
    assert embkv.KERNEL_BACKEND == "c"


def test_a_missing_c_kernel_warns_and_falls_back_to_numpy():
    script = """
import sys, warnings
sys.modules["embkv.file._kernels"] = None  # the import of the compiled kernel fails
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import embkv
print(embkv.KERNEL_BACKEND)
print(",".join(type(w.message).__name__ for w in caught))
print(all(isinstance(w.message, embkv.EmbkvWarning) for w in caught))
"""
    env = dict(os.environ)
    env.pop("EMBKV_KERNEL", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["numpy", "KernelFallbackWarning", "True"], proc.stdout


def test_asking_for_the_numpy_kernel_gives_no_warning():
    proc = subprocess.run([sys.executable, "-W", "error", "-c", "import embkv; print(embkv.KERNEL_BACKEND)"],
                          env=numpy_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["numpy"]


def test_table_error_conformance_and_cache_suites_pass_on_numpy_kernel():
    session = "np" + uuid.uuid4().hex[:10]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/file/test_table.py", "tests/file/test_errors.py",
         "tests/file/test_conformance.py", "tests/compute/test_cache.py", "-q", "-p", "no:cacheprovider", "-x"],
        cwd=ROOT, env=numpy_env(EMBKV_TEST_SESSION=session), capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"\b(failed|errors?)\b", summary), out
    assert session_leftovers(session) == []


def test_files_are_shared_between_kernels(store):
    ints = store.create_table("ints", dim=16, capacity=16)
    keys = np.arange(0, 3000, 3)
    ints.put(keys, encode(keys, 1))
    ints.delete(keys[:10])
    strs = store.create_table("strs", dim=16, key_type="str")
    skeys = ["", "a", "a\x00", "ключ", "🔑" * 20]
    strs.put(skeys, encode(np.arange(5), 1))
    strs.put([b"\xff\x00"], encode([5], 1))

    out = run_numpy("""
        import sys
        import numpy as np
        import embkv
        from helpers import check_vectors, encode
        assert embkv.KERNEL_BACKEND == "numpy"
        store = embkv.open(sys.argv[1])
        ints, strs = store["ints"], store["strs"]
        keys = np.arange(0, 3000, 3)
        vectors, found = ints.get(keys)
        assert found.tolist() == [False] * 10 + [True] * (len(keys) - 10)
        assert (check_vectors(keys[10:], vectors[10:]) == 1).all()
        skeys = ["", "a", "a\\x00", "ключ", "🔑" * 20, b"\\xff\\x00"]
        vectors, found = strs.get(skeys)
        assert found.all() and check_vectors(np.arange(6), vectors).tolist() == [1] * 6
        assert not strs.contains(["a\\x00\\x00", "b"]).any()
        # write through the numpy kernel: updates, deletes, growth
        ints.put(keys[:10], encode(keys[:10], 2))
        more = np.arange(10_000, 14_000)
        ints.put(more, encode(more, 2))
        assert ints.delete([3000 - 3]) == 1
        strs.put(["a", "new"], encode([1, 6], 2))
        assert strs.delete([""]) == 1
        print(len(ints), len(strs))
    """, store.path)
    assert out.split() == [str(len(keys) - 1 + 4000), "6"]

    vectors, found = ints.get(keys)
    assert found.tolist() == [True] * (len(keys) - 1) + [False]
    assert check_vectors(keys[:-1], vectors[:-1]).tolist() == [2] * 10 + [1] * (len(keys) - 11)
    more = np.arange(10_000, 14_000)
    assert (check_vectors(more, ints.get(more)[0]) == 2).all()
    vectors, found = strs.get(["", "a", "new", "ключ"])
    assert found.tolist() == [False, True, True, True]
    assert check_vectors([1, 6, 3], vectors[1:]).tolist() == [2, 2, 1]
    for t in (ints, strs):
        info = t.info()
        assert info["rows_used"] - info["free_rows"] == info["rows"] == len(t)
