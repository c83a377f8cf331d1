"""The CPU LoRA kernel (csrc/lora_cpu.cpp), compiled with torch's extension tools on first use.

`make install` builds it ahead of time (`python -m server.model.lora_ext`); the
build is cached under torch's extensions directory. Where no compiler is at hand,
or ADAPTER_SERVER_NO_EXT=1, `kernel()` returns None and callers use plain torch.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.cpp"
_lock = threading.Lock()
_state: dict = {}


def kernel():
    """The compiled module (with `add_lora_rows_`), or None if it cannot be built here."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def _build():
    if os.environ.get("ADAPTER_SERVER_NO_EXT") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load("adapter_server_lora_cpu", [str(_SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    verbose=False)
    except Exception as exc:  # no compiler, no ninja, ...: the torch path still serves every request
        log.warning("CPU LoRA kernel unavailable (%s); using the plain torch path", exc)
        return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    log.info("CPU LoRA kernel %s", "built" if kernel() is not None else "NOT available")
