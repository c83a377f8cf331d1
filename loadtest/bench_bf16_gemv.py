"""The bf16 GEMV of decode against oneDNN's packed bf16 linear, per shape and M (issue 23): `make bench-bf16-gemv`.

The question: for the default model's linears (SmolLM2-135M: the tied lm_head 49152x576, the MLP's 1536x576 and
576x1536, attention's 576x576 and 192x576) at the M of decode, how long does y = x @ W^T take in our kernel
(server/model/csrc/bf16_gemm_cpu.cpp, reading W as stored) against `torch.ops.mkldnn._linear_pointwise` on W
pre-packed by oneDNN (server/model/packed_linear.py before issue 23), and how close is each to the memory bound?
Also aten's `linear` on the plain matrix: what serves M above packed_linear.GEMV_MAX_ROWS now that the matrix is
held once, plain (the constant is chosen from ours against aten). Printed per (shape, M): ms per call (best of
`--rounds` timings of `--calls` calls, the paths alternating in each round), the weight GB/s (weight bytes / time;
at M = 1 the weight is all a GEMV reads) and the ratios oneDNN / ours and aten / ours (> 1: ours is faster). A weight larger than the caches is re-read from memory each call; the small
ones may stay in L2/L3 between calls, as they do not in a model (30 layers' weights pass through in between), so
their GB/s are upper bounds.

    python -m loadtest.bench_bf16_gemv [--m 1 4 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from server.model import cpu_ext

SHAPES = [(49152, 576, "lm_head"), (1536, 576, "gate/up"), (576, 1536, "down"), (576, 576, "q/o"), (192, 576, "k/v")]


def best_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="*", default=[1, 4, 32])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=0, help="calls per timing (default: ~50 MB of weights read)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kernel = cpu_ext.kernel()
    if kernel is None:
        raise SystemExit("the CPU kernels are not available here")
    print(f"load average {os.getloadavg()[0]:.1f}, {a.threads} thread(s)\n")
    print("| weight | M | oneDNN packed ms | GB/s | aten ms | ours ms | GB/s | oneDNN / ours | aten / ours |\n"
          "|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for n, k, name in SHAPES:
        weight = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        gbytes = weight.numel() * 2 / 1e9
        calls = a.calls or max(3, int(0.05 / gbytes))
        for m in a.m:
            x = torch.randn(m, k, generator=gen).bfloat16()
            paths = {"onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                     "aten": lambda: torch.nn.functional.linear(x, weight),
                     "ours": lambda: kernel.bf16_linear(x, weight, None)}
            torch.testing.assert_close(paths["ours"]().float(), paths["onednn"]().float(), atol=2e-2, rtol=2e-2)
            best = {key: float("inf") for key in paths}
            for _ in range(a.rounds):
                for key, fn in paths.items():
                    fn()
                    best[key] = min(best[key], best_ms(fn, calls))
            print(f"| {name} {n}x{k} | {m} | {best['onednn']:.3f} | {gbytes / best['onednn'] * 1e3:.1f} | "
                  f"{best['aten']:.3f} | {best['ours']:.3f} | {gbytes / best['ours'] * 1e3:.1f} | "
                  f"{best['onednn'] / best['ours']:.2f}x | {best['aten'] / best['ours']:.2f}x |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
