"""The CPU kernels (csrc/*.cpp), compiled into one module with torch's extension tools on first use.

- `add_lora_rows_` (lora_cpu.cpp): mixed-adapter LoRA decode, each row reading its own slot's factors;
- `decode_attention_` (decode_attention_cpu.cpp): decode attention fused with the KV-cache write;
- `rms_norm`, `add_rms_norm_`, `silu_mul_` (norm_act_cpu.cpp): the decoder layer's elementwise ops fused
  (server.model.fused_ops chooses between them and their torch reference);
- `qgemm_pack`, `qgemm`, `qgemm_unpack` (qgemm_cpu.cpp): block-quantized (4/8-bit, blocks of 32) GEMV/GEMM with
  int8-quantized activations, for --quantization gguf | int4-wo | int8-wo (server.model.weight_only).
- `bf16_linear` (bf16_gemm_cpu.cpp): x @ W^T + b for a bf16 W at the small M of decode
  (server.model.packed_linear chooses between it and oneDNN).

`make install` builds it ahead of time (`python -m server.model.cpu_ext`); the
build is cached under torch's extensions directory. Where no compiler is at hand,
or ADAPTER_SERVER_NO_EXT=1, `kernel()` returns None and callers use plain torch.

The build uses -march=native, so it is named after the CPU's instruction-set flags:
a cache directory that moves between CPU kinds (a Docker volume, a shared home; Intel
AVX512 vs AMD AVX2) gets one build per kind instead of loading code the CPU cannot
run (SIGILL kills the process; it is not an exception). ADAPTER_SERVER_EXT_MARCH=<arch>
(e.g. x86-64-v3, what an AVX2-only EPYC Zen 3 runs) builds for that -march instead, under a
name of its own: the tests use it to run another CPU kind's vectorized code on this machine.

Builds are serialised by an `flock` on `<build dir>.lock`, which the kernel drops when its
holder dies. torch's own lock (a `lock` file in the build directory, `FileBaton`) is not:
a process killed while it built left it behind, and every later server and test then waited
on it forever without a word. Every builder here takes the flock first, so a `lock` file found
while holding it is such a leftover and is removed. A builder that cannot get the flock within
ADAPTER_SERVER_EXT_WAIT seconds (default 600) logs the lock's path and serves with the torch paths.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("bindings.cpp", "lora_cpu.cpp", "decode_attention_cpu.cpp", "norm_act_cpu.cpp",
                         "qgemm_cpu.cpp", "bf16_gemm_cpu.cpp")]
_lock = threading.Lock()
_state: dict = {}


def kernel():
    """The compiled module (`add_lora_rows_`, `decode_attention_`, `rms_norm`, `add_rms_norm_`, `silu_mul_`), or None
    if it cannot be built here."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def isa_tag() -> str:
    """A short hash of this CPU's instruction-set flags (/proc/cpuinfo), which -march=native compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((line.split(":", 1)[-1] for line in lines if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    flags = " ".join(sorted(set(flags.split()))) or platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:12]


def march_flag() -> str:
    """The -march the kernels are built for: native, or ADAPTER_SERVER_EXT_MARCH (checked: letters, digits, -._)."""
    march = os.environ.get("ADAPTER_SERVER_EXT_MARCH", "native")
    if not march or not all(c.isalnum() or c in "-._" for c in march):
        raise ValueError(f"ADAPTER_SERVER_EXT_MARCH={march!r} is not an -march value")
    return march


def _build():
    if os.environ.get("ADAPTER_SERVER_NO_EXT") == "1":
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        march = march_flag()
        tag = isa_tag() if march == "native" else march.replace("-", "_").replace(".", "_")
        name = f"adapter_server_cpu_{tag}"
        build_dir = Path(_get_build_directory(name, verbose=False))
        with _build_lock(build_dir, float(os.environ.get("ADAPTER_SERVER_EXT_WAIT", "600"))):
            return load(name, [str(p) for p in _SOURCES], extra_cflags=["-O3", f"-march={march}", "-fopenmp"],
                        build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a lock held too long: the torch path serves every request
        log.warning("CPU kernels unavailable (%s); using the plain torch paths", exc)
        return None


class _build_lock:
    """Hold an exclusive flock on `<build_dir>.lock` (released by the kernel if this process dies) and clear a
    `lock` file that a killed torch build left in `build_dir`; TimeoutError after `wait` seconds."""

    def __init__(self, build_dir: Path, wait: float):
        self.build_dir, self.wait = build_dir, wait
        self.path = build_dir.with_name(build_dir.name + ".lock")

    def __enter__(self):
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"another process has been building the CPU kernels for over {self.wait:.0f} s "
                                       f"(it holds {self.path}; ADAPTER_SERVER_EXT_WAIT sets the wait)") from None
                time.sleep(0.2)
        stale = self.build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a CPU-kernel build that was killed", stale)
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    log.info("CPU kernels %s", "built" if kernel() is not None else "NOT available")
