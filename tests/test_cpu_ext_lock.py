"""Building the CPU kernels never hangs on a lock left by a killed build (server.model.cpu_ext)."""
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.model import cpu_ext

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import logging, sys; logging.basicConfig(level=logging.WARNING); from server.model import cpu_ext; "
         "print('KERNEL', cpu_ext.kernel() is not None); sys.stdout.flush()")


def build_dir() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(f"adapter_server_cpu_{cpu_ext.isa_tag()}", verbose=False))


def probe(env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_a_lock_left_by_a_killed_build_is_cleared():
    """torch's own `lock` file, as a build killed mid-way leaves it (before the fix, every later build waited on it
    forever). The kernels are built already (make install), so this loads them within seconds."""
    if os.environ.get("ADAPTER_SERVER_NO_EXT") == "1" or cpu_ext.kernel() is None:
        pytest.skip("no C++ toolchain here: the kernels are not built")
    stale = build_dir() / "lock"
    stale.write_text("")
    result = probe({}, timeout=300)
    assert "KERNEL True" in result.stdout, result.stderr[-2000:]
    assert "left by a CPU-kernel build that was killed" in result.stderr
    assert not stale.exists()


def test_a_live_builder_is_waited_for_then_the_torch_path_serves(tmp_path, monkeypatch):
    """Another process holds the build lock (it is building): wait ADAPTER_SERVER_EXT_WAIT seconds, then say
    which lock and serve without the kernels, instead of hanging."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: nothing built there
    target = build_dir()
    lock = target.with_name(target.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        result = probe({"ADAPTER_SERVER_EXT_WAIT": "2"}, timeout=120)
        waited = time.monotonic() - started
    assert "KERNEL False" in result.stdout, result.stderr[-2000:]
    assert str(lock) in result.stderr and "ADAPTER_SERVER_EXT_WAIT" in result.stderr
    assert waited >= 2
