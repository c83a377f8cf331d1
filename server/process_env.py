"""Settings torch reads once per process, at its first CPU allocation: `apply()` runs before torch is imported.

THP_MEM_ALLOC_ENABLE=1 makes torch allocate every tensor of 2 MB or more 2 MB-aligned and ask the
kernel for transparent huge pages for it (madvise; the default THP mode here is `madvise`, so
nothing gets them unasked). A decode step streams every weight, ~440 MB for the ~134M Llama of
bench_engine in fp32, and on 4 KB pages its GEMMs miss in the TLB. Measured (2 vCPUs of an Intel
Xeon, base, batch 32, 64 new tokens, the engine in-process, three alternating pairs of runs):
498-503 tok/s with it, 478-489 without (+3-4%); huge pages for the KV cache alone gave +0.8%.
A variable the user sets wins (`THP_MEM_ALLOC_ENABLE=0` turns it off).
"""
from __future__ import annotations

import os

SETTINGS = {"THP_MEM_ALLOC_ENABLE": "1"}


def apply() -> None:
    for name, value in SETTINGS.items():
        os.environ.setdefault(name, value)
