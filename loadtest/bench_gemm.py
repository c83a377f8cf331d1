"""One linear of the default model, every CPU GEMM path, per shape and M (issue 23): `make bench-gemm`.

The question: for SmolLM2-135M's linears (the tied lm_head 49152x576, the MLP's 1536x576 and 576x1536, attention's
576x576 and 192x576), how long does one y = x @ W^T take, with bf16 x, on

- `bf16-packed`: oneDNN's packed bf16 linear (server.model.packed_linear, prefill and large batches);
- `bf16-gemv`: our bf16 GEMV on the plain matrix (csrc/bf16_gemm_cpu.cpp, bf16 decode up to GEMV_MAX_ROWS rows);
- `aten-bf16`: aten's linear on the plain matrix;
- `qgemm-q4` / `qgemm-q8`: our block-quantized kernel (csrc/qgemm_cpu.cpp: gguf, int4-wo, int8-wo);
- `torch-int4` / `torch-int8`: torch's weight-only kernels (group 32 / per channel: the paths before qgemm),

at the M of single-stream decode (1), small batches (4) and full batches (32), or a prefill chunk (`--m 512`)?

`--cold` (the default) is what a model does: each call reads a different copy of the weight, cycling through
enough copies (>= `--cold-mb`, default 256 MB, beyond this machine's 32 MB L3) that every call streams its weight
from memory, as the 30 layers' weights in between do in a decoded token. `--hot` calls one copy again and again,
so the small matrices stay in L2/L3: that overstates the small shapes by up to 10x (the qgemm and bf16 GEMV micro
tables of the first runs were hot; docs/BENCHMARKS.md). Printed per (shape, M): ms per call (the best of
`--rounds`, the paths alternating in each round), and the weight GB/s (bytes of the path's weight / time), the
measure of a GEMV at M = 1.

    python -m loadtest.bench_gemm [--m 1 4 32] [--hot] [--paths bf16-packed qgemm-q4 ...]
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

import torch

SHAPES = [(49152, 576, "lm_head"), (1536, 576, "gate/up"), (576, 1536, "down"), (576, 576, "q/o"), (192, 576, "k/v")]
PATHS = ["bf16-packed", "bf16-gemv", "aten-bf16", "qgemm-q4", "qgemm-q8", "torch-int4", "torch-int8"]


def weights(path: str, n: int, k: int, kernel, gen: torch.Generator):
    """(make: () -> one copy of the path's weight, its bytes, fn(x, weight) -> y). Random values (the time does not
    depend on them); copies are cheap clones of one, each in memory of its own."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    scales = torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3
    plain = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
    if path == "bf16-packed":  # oneDNN's opaque layout: packed again from the plain matrix per copy
        return (lambda: torch.ops.mkldnn._reorder_linear_weight(plain, 1), n * k * 2,
                lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    if path == "bf16-gemv":
        return plain.clone, n * k * 2, lambda x, w: kernel.bf16_linear(x, w, None)
    if path == "aten-bf16":
        return plain.clone, n * k * 2, lambda x, w: torch.nn.functional.linear(x, w)
    if path in ("qgemm-q4", "qgemm-q8"):
        bits = 4 if path == "qgemm-q4" else 8
        q = codes if bits == 4 else codes * 16 - 128
        w = kernel.qgemm_pack(q, scales, -8 * scales if bits == 4 else torch.zeros_like(scales), bits)
        return (lambda: tuple(t.clone() for t in w), sum(t.numel() * t.element_size() for t in w),
                lambda x, w: kernel.qgemm(x, *w, n, bits))
    if path == "torch-int4":
        pad = -n % 16  # the kernel wants N % 16 == 0
        padded = torch.cat([codes, codes[:pad]]) if pad else codes
        sz = torch.stack([scales.t(), torch.zeros_like(scales).t()], -1).bfloat16()
        sz = (torch.cat([sz, sz[:, :pad]], dim=1) if pad else sz).contiguous()
        w = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1), sz)
        return (lambda: tuple(t.clone() for t in w), n * k // 2 + sz.numel() * 2,
                lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1])[:, :n])  # as Int4Linear
    if path == "torch-int8":
        w = ((codes * 16 - 128).clamp(-127, 127).to(torch.int8), scales[:, 0].bfloat16().contiguous())
        return (lambda: tuple(t.clone() for t in w), n * k + n * 2,
                lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1]))
    raise ValueError(path)


def time_ms(fn, x, copies: list, calls: int) -> float:
    ring = itertools.cycle(copies)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x, next(ring))
    return (time.perf_counter() - start) / calls * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="*", default=[1, 4, 32])
    p.add_argument("--paths", nargs="*", default=PATHS, choices=PATHS)
    p.add_argument("--hot", action="store_true", help="one copy of each weight, called again and again (cache-hot)")
    p.add_argument("--cold-mb", type=int, default=256, help="--cold: MB of weight copies cycled per path and shape")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    from server.model import cpu_ext

    kernel = cpu_ext.kernel()
    if kernel is None:
        raise SystemExit("the CPU kernels are not built here (no compiler, or ADAPTER_SERVER_NO_EXT=1)")
    torch.set_num_threads(a.threads)
    print(f"{a.threads} thread(s), load average {os.getloadavg()[0]:.1f}, {'hot' if a.hot else 'cold'} weights; "
          f"ms per call (best of {a.rounds}) and weight GB/s\n")
    print("| weight | M | " + " | ".join(a.paths) + " |\n|---|---|" + "---|" * len(a.paths))
    gen = torch.Generator().manual_seed(0)
    for n, k, name in SHAPES:
        sets = {}
        for path in a.paths:
            make, nbytes, fn = weights(path, n, k, kernel, gen)
            count = 1 if a.hot else max(2, -(-a.cold_mb * 2**20 // nbytes))
            sets[path] = ([make() for _ in range(count)], nbytes, fn)
        for m in a.m:
            x = torch.randn(m, k, generator=gen).bfloat16()
            best = dict.fromkeys(a.paths, float("inf"))
            for _ in range(a.rounds):
                for path, (copies, nbytes, fn) in sets.items():
                    calls = max(3, len(copies), int(0.05e9 / nbytes))
                    fn(x, copies[0])
                    best[path] = min(best[path], time_ms(fn, x, copies, calls))
            cells = " | ".join(f"{best[p]:.3f} ({sets[p][1] / best[p] / 1e6:.0f})" for p in a.paths)
            print(f"| {name} {n}x{k} | {m} | {cells} |", flush=True)
        del sets
    print(f"\nload average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
