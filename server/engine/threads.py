"""Torch's CPU threads: one OpenMP team per process, the engine thread's.

torch's CPU wheel runs its parallel ops on GNU OpenMP (libgomp). Every thread that enters a
parallel region gets a team of worker threads of its own, and the team outlives the region.
Once a process holds more OpenMP threads than CPUs, libgomp cuts every team's spin-wait to
about 100 iterations, so each of a decode step's hundreds of parallel ops has to wake its
workers through the kernel. The server builds the engine in the main thread and steps it in
the engine thread: two teams. Measured (2 vCPUs of an Intel Xeon, the ~134M Llama of
bench_engine, fp32, batch 32, 64 new tokens): the engine thread made 438-456 tok/s when it
was the only thread that had run a parallel op, 361-387 tok/s once the main thread had
(loading the model), and 244 tok/s with OMP_WAIT_POLICY=active (the idle team then spins on
a CPU the engine needs); the same loop on the main thread alone made 432-447.

So the engine is built with torch at one thread (`serial`: no parallel region, so no team in
the building thread), the engine thread takes the thread count for itself (`adopt`), and the
helper threads that touch tensors (adapter loading, upload checks) run their ops inline
(`inline_parallel_ops`).
"""
from __future__ import annotations

import ctypes
import functools
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


@contextmanager
def serial() -> Iterator[int]:
    """Run the body with torch at one thread; yields the thread count it had, restored on exit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def adopt(threads: int) -> None:
    """Called first in the thread that runs every forward: torch's thread count there (and its default). The
    OpenMP workers it starts inherit its OS name ("engine")."""
    name_os_thread()
    torch.set_num_threads(max(1, threads))


def name_os_thread() -> None:
    """Give the calling thread its Python name at the OS level too (Linux ``prctl(PR_SET_NAME)``, 15 bytes), so
    ``top -H``, ``ps -L`` and /proc/<pid>/task/*/comm tell the engine, its OpenMP workers and the adapter threads
    apart (loadtest.bench_many_adapters reads each one's CPU time). A no-op elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, threading.current_thread().name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):
        pass


def inline_parallel_ops() -> None:
    """In a helper thread: its parallel ops run inline on it, so it never gets an OpenMP team.

    `torch.set_num_threads` would not do: it also sets torch's and MKL's process-wide counts,
    which the engine thread's GEMMs read. OpenMP's own thread count is per thread, so this
    calls libgomp's `omp_set_num_threads(1)`, after torch's lazy per-thread initialisation
    (which would set it back). A no-op where torch runs on no libgomp (macOS, Intel OpenMP).
    """
    name_os_thread()
    torch.get_num_threads()  # torch initialises this thread's OpenMP count on first use
    libgomp = _libgomp()
    if libgomp is not None:
        libgomp.omp_set_num_threads(1)


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (the wheel bundles its own copy), found in this process's memory map."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None
