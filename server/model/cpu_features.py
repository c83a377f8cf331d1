"""What the CPU can do fast, read once from /proc/cpuinfo: the one place that decides it.

Tests force the other CPU kinds' paths by monkeypatching `cpu_has_fast_bf16` on this module (every caller
goes through the module attribute, never a copied reference).
"""
from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16); elsewhere bf16 GEMM is emulated and slow
    (Intel model 207 with AVX-512 but no avx512_bf16, AMD Zen 3 with AVX2 only)."""
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags
