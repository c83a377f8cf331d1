"""Which GEMM kernel for a quantized linear, per M (issue 23): `make bench-qgemm`.

The question: for the default model's shapes (the tied lm_head 49152x576, an MLP gate/up 1536x576, the down
576x1536), how long does one y = x @ W^T take with bf16 activations on

- qgemm Q4 / Q8 (server/model/csrc/qgemm_cpu.cpp: blocks of 32, int8 activations),
- torch's int4 kernel (`_weight_int4pack_mm_for_cpu`, group 32: the int4 path before qgemm),
- torch's int8 kernel (`_weight_int8pack_mm`, per channel: int8-wo before qgemm),
- bf16 oneDNN-packed (server.model.packed_linear: the dense bf16 path),

at M = 1 (single-stream decode), 4, 32 (batched decode) and 512 (a prefill chunk)? Rounds alternate the kernels
(the machine is shared, so compare within one run); the best of --rounds counts. Printed: ms per call and the
ratio to bf16-packed. The weights are random codes; the time does not depend on their values.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

SHAPES = {"lm_head 49152x576": (49152, 576), "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536)}


def timed(fn, seconds: float) -> float:
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e3


def kernels(n: int, k: int, kernel):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    scales = torch.rand(n, k // 32) * 0.01 + 1e-3
    offsets = -8 * scales
    q4 = kernel.qgemm_pack(codes, scales, offsets, 4)
    q8 = kernel.qgemm_pack(codes * 16 - 128, scales, torch.zeros_like(scales), 8)
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale_zeros = torch.stack([scales.t(), torch.zeros_like(scales).t()], -1).bfloat16().contiguous()
    int8 = (codes * 16 - 128).clamp(-127, 127).to(torch.int8)
    int8_scales = scales[:, 0].bfloat16().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(kernel.qgemm_unpack(*q4, n, k, 4).bfloat16(), 32)
    return {
        "qgemm Q4": lambda x: kernel.qgemm(x, *q4, n, 4),
        "qgemm Q8": lambda x: kernel.qgemm(x, *q8, n, 8),
        "torch int4": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, 32, scale_zeros),
        "torch int8": lambda x: torch.ops.aten._weight_int8pack_mm(x, int8, int8_scales),
        "bf16-packed": lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 4, 32, 512])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.3, help="per kernel, M and round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    from server.model import cpu_ext

    kernel = cpu_ext.kernel()
    if kernel is None or not hasattr(kernel, "qgemm"):
        raise SystemExit("the CPU kernels are not built here (no compiler, or ADAPTER_SERVER_NO_EXT=1)")
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}; ms per call (best of {args.rounds}), "
          "ratio to bf16-packed")
    for label, (n, k) in SHAPES.items():
        fns = kernels(n, k, kernel)
        for m in args.ms:
            x = torch.randn(m, k).bfloat16()
            best = {name: float("inf") for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    best[name] = min(best[name], timed(lambda: fn(x), args.seconds))
            ref = best["bf16-packed"]
            cells = "  ".join(f"{name} {ms:.3f} ({ref / ms:.2f}x)" for name, ms in best.items())
            print(f"{label} M={m}: {cells}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
