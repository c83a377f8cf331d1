"""The CPU kernels (csrc/*.cpp), compiled into one module with torch's extension tools on first use.

- `add_lora_rows_` (lora_cpu.cpp): mixed-adapter LoRA decode, each row reading its own slot's factors;
- `decode_attention_` (decode_attention_cpu.cpp): decode attention fused with the KV-cache write.

`make install` builds it ahead of time (`python -m server.model.cpu_ext`); the
build is cached under torch's extensions directory. Where no compiler is at hand,
or ADAPTER_SERVER_NO_EXT=1, `kernel()` returns None and callers use plain torch.

The build uses -march=native, so it is named after the CPU's instruction-set flags:
a cache directory that moves between CPU kinds (a Docker volume, a shared home; Intel
AVX512 vs AMD AVX2) gets one build per kind instead of loading code the CPU cannot
run (SIGILL kills the process; it is not an exception).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("bindings.cpp", "lora_cpu.cpp", "decode_attention_cpu.cpp")]
_lock = threading.Lock()
_state: dict = {}


def kernel():
    """The compiled module (`add_lora_rows_`, `decode_attention_`), or None if it cannot be built here."""
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


def _build():
    if os.environ.get("ADAPTER_SERVER_NO_EXT") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(f"adapter_server_cpu_{isa_tag()}", [str(p) for p in _SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    verbose=False)
    except Exception as exc:  # no compiler, no ninja, ...: the torch path still serves every request
        log.warning("CPU kernels unavailable (%s); using the plain torch paths", exc)
        return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    log.info("CPU kernels %s", "built" if kernel() is not None else "NOT available")
