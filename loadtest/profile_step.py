"""Where a decode step's time goes: the engine at the server's default flags, batch 32, under torch's profiler.

On the ~134M Llama of bench_engine (hidden 768, 12 layers, vocab 32000), in the
dtype the server resolves for this machine, 32 requests of a 16-token prompt and
`--new-tokens` tokens each, with `--kind` adapters (base: none; lora/ia3/prefix: 32
distinct ones). Every profiled op is put in one bucket by name (GEMMs, attention,
KV writes, adapter ops, sampling, norms/rope/elementwise, other); the detokenizer, the
engine's Python (scheduler, postprocess) and the compiled CPU kernels (decode attention with
its KV write, mixed-adapter LoRA) are timed around their functions. HTTP
and the event loop are not in this process: `make bench-served` gives their share as
1 - served / engine-only.

    python -m loadtest.profile_step [--kind base|lora|ia3|prefix] [--new-tokens 32]

`--count-ops` (issue 23, point 4: per-token overhead) instead counts the aten calls of one decoded token at the
server's default flags on the default model (SmolLM2-135M-Instruct; `--quantization auto`, `--dtype auto`: the
GGUF grid in bf16 on a CPU with native bf16), one stream: every `aten::` event the profiler records, nested ones
included, for a request of `--count-tokens` new tokens minus one of 2 tokens, divided by the difference (so the
prefill and the engine's set-up cancel out). A count, not a time: valid on a loaded machine.

    python -m loadtest.profile_step --count-ops [--count-tokens 10] [--top 15] [--quantization Q --dtype D]

It also times the decode of a `--time-tokens` request (ms per token, no profiler) and, in one more request, the
time inside the GEMM modules' forwards (int4/int8 weight-only, oneDNN packed, nn.Linear), so the time outside the
GEMMs is the difference. `--quantization`/`--dtype` override the defaults (e.g. `none` +
`bfloat16`: the oneDNN-packed bf16 path; `int8-wo`).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from loadtest.adapters_gen import AdapterFactory, register
from loadtest.bench_engine import make_model_dir, prompts
from server.config import EngineConfig
from server.engine import detokenizer, scheduler as scheduler_module
from server.engine.engine import Engine
from server.engine.factory import resolve
from server.engine.request import SamplingParams
from server.model import cpu_ext
from server.model.loader import load_model, parse_dtype

BATCH = 32
BUCKETS = [  # (bucket, substrings of op names), first match wins
    ("GEMM (linears, lm_head)", ("linear", "addmm", "aten::mm", "matmul", "mkldnn", "pack_mm")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("KV cache write", ("index_copy",)),
    ("adapter ops (LoRA kernel, bmm, IA3 gathers)", ("add_lora", "bmm", "index_select", "lora")),
    ("sampling (argmax, softmax, sort)", ("argmax", "softmax", "sort", "topk", "searchsorted", "cumsum")),
    ("norms, rope, activations, elementwise", ("mul", "add", "silu", "pow", "mean", "rsqrt", "cos", "sin", "neg",
                                              "cat", "div", "sub")),
]


class Stopwatch:
    """Wraps functions and adds up the wall time spent in them."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, attr, timed)


def bucket_of(name: str) -> str:
    lowered = name.lower()
    for bucket, needles in BUCKETS:
        if any(n in lowered for n in needles):
            return bucket
    return "other torch ops"


def aten_calls(engine: Engine, new_tokens: int) -> Counter:
    """aten:: events by name (nested included) of one greedy request of ``new_tokens`` tokens under the profiler."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate([engine.make_request(prompts(1)[0], params)])
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def count_ops(args) -> dict:
    """aten calls per decoded token at default flags on the default model (see the module docstring)."""
    if args.count_tokens < 3:
        raise SystemExit("--count-tokens must be at least 3 (the count is the difference against 2 tokens)")
    config = resolve(replace(EngineConfig(), quantization=args.quantization, dtype=args.dtype))  # default model
    loaded = load_model(config.model, dtype=parse_dtype(config.dtype), quantization=config.quantization,
                        batch_hint=config.max_batch)
    engine = Engine(loaded, config)
    aten_calls(engine, 2)  # warm-up: kernels built, caches filled
    short, long = aten_calls(engine, 2), aten_calls(engine, args.count_tokens)
    steps = args.count_tokens - 2
    per_op = {name: (long[name] - short[name]) / steps for name in long | short}
    total = sum(per_op.values())
    print(f"default model, quantization {config.quantization}, {config.dtype}, 1 stream: "
          f"{total:.0f} aten calls per decoded token (nested included; {steps} tokens)")
    for name, n in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {n:8.1f}  {name}")
    ms, gemm_ms = decode_times(engine, args.time_tokens)
    print(f"decode: {ms:.2f} ms per token ({1000 / ms:.1f} tok/s, best of 3 requests of {args.time_tokens} tokens, "
          f"no profiler); in the GEMM modules {gemm_ms:.2f} ms per token (timed around each linear's forward, "
          f"one more request), outside them {ms - gemm_ms:.2f} ms")
    return {"quantization": config.quantization, "dtype": config.dtype, "aten_calls_per_token": total,
            "by_op": per_op, "ms_per_token": ms, "gemm_ms_per_token": gemm_ms}


def decode_times(engine: Engine, tokens: int) -> tuple[float, float]:
    """(ms per decoded token, best of 3 requests; ms per decoded token inside the GEMM modules: every linear's
    forward (int4/int8 weight-only, oneDNN-packed, nn.Linear, the lm_head) timed around its call in one more
    request, a `tokens` request minus a 2-token one like the count). Timed by the clock, not the profiler:
    profiler self times inflated under load (more GEMM time than wall time per token on a loaded machine)."""
    from loadtest.bench_single_stream import decode_rate
    from server.model.packed_linear import PackedLinear
    from server.model.weight_only import Int4Linear, Int8Linear

    ids = prompts(1)[0]
    ms = min(1000 / decode_rate(engine, ids, tokens) for _ in range(3))
    watch = Stopwatch()
    gemms = [m for m in engine.runner.model.modules() if isinstance(m, (Int4Linear, Int8Linear, PackedLinear, nn.Linear))]
    for module in gemms:
        watch.wrap(module, "forward", "gemm")

    def gemm_seconds(n: int) -> float:
        watch.seconds.clear()
        engine.generate([engine.make_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))])
        return watch.seconds["gemm"]

    try:
        return ms, (gemm_seconds(tokens) - gemm_seconds(2)) / (tokens - 2) * 1e3
    finally:
        for module in gemms:
            del module.forward

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["base", "lora", "ia3", "prefix", "houlsby"], default="base",
                        help="houlsby: 32 distinct AdapterHub double_seq_bn adapters, reduction 16 (bench_bottleneck)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--count-ops", action="store_true", help="aten calls per decoded token at default flags on "
                        "the default model, one stream, instead of the batch-32 time profile")
    parser.add_argument("--count-tokens", type=int, default=10, help="--count-ops: tokens of the long request")
    parser.add_argument("--top", type=int, default=15, help="--count-ops: the ops with most calls to list; the time "
                        "profile: the ops with most self time")
    parser.add_argument("--time-tokens", type=int, default=32, help="--count-ops: tokens of the timed requests")
    parser.add_argument("--quantization", default="auto", help="--count-ops / --default-model: instead of the "
                        "default (auto)")
    parser.add_argument("--dtype", default="auto", help="--count-ops / --default-model: instead of the default (auto)")
    parser.add_argument("--default-model", action="store_true", help="the batch-32 profile on the default model "
                        "(SmolLM2-135M-Instruct at --quantization/--dtype) instead of the 134M bench Llama")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.count_ops:
        count_ops(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.default_model:  # the default model at --quantization/--dtype (auto: the GGUF grid in bf16 here)
            config = resolve(replace(EngineConfig(), quantization=args.quantization, dtype=args.dtype,
                                     max_batch=BATCH, max_adapter_slots=BATCH, adapter_dir=str(root / "store")))
            model_dir = Path(config.model)
        else:
            model_dir = make_model_dir(root / "model")
            config = resolve(replace(EngineConfig(), model=str(model_dir), max_batch=BATCH, max_adapter_slots=BATCH,
                                     adapter_dir=str(root / "store")))
        names: list[str | None] = [None] * BATCH
        if args.kind == "houlsby":
            from adapters.store import AdapterStore
            from loadtest.bench_bottleneck import write_bottleneck

            store = AdapterStore(root / "store")
            for i in range(BATCH):
                store.add(f"houlsby-{i}", write_bottleneck(root / "hub" / f"houlsby-{i}", model_dir, "houlsby", i))
            names = [f"houlsby-{i}" for i in range(BATCH)]
        elif args.kind != "base":
            factory = AdapterFactory(model_dir, root / "adapters", rank=16, prefix_tokens=16, seed=1)
            specs = [factory.get(args.kind, i) for i in range(BATCH)]
            register(root / "store", specs)
            names = [s.name for s in specs]
        loaded = load_model(model_dir, dtype=parse_dtype(config.dtype), quantization=config.quantization,
                            batch_hint=BATCH)
        engine = Engine(loaded, config)
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

        def batch():
            return [engine.make_request(p, params, adapter=a) for p, a in zip(prompts(BATCH), names)]

        engine.generate(batch())  # warm-up: adapters resident, kernels built
        watch = Stopwatch()
        watch.wrap(detokenizer.IncrementalDetokenizer, "add", "detokenizer")
        watch.wrap(scheduler_module.Scheduler, "schedule", "scheduler (pure Python)")
        watch.wrap(engine, "_postprocess", "postprocess (append, finish, merge policy; incl. detokenizer)")
        kernels = cpu_ext.kernel()
        if kernels is not None:  # compiled code, not torch ops: the profiler does not see them
            watch.wrap(kernels, "decode_attention_", "decode attention + KV write (CPU kernel)")
            watch.wrap(kernels, "add_lora_rows_", "LoRA rows (CPU kernel)")
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(batch())
        wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[bucket_of(event.key)] += event.self_cpu_time_total / 1e6
    steps = args.new_tokens
    print(f"{args.kind}: {BATCH} rows x {steps} tokens, {Path(config.model).name}, {config.quantization}, "
          f"{config.dtype}, max_seq_len {config.max_seq_len}, "
          f"{args.threads} threads: {wall:.2f} s under the profiler ({BATCH * steps / wall:.0f} tok/s), "
          f"{wall / steps * 1e3:.1f} ms/step")
    print(f"{'bucket':<62} {'ms/step':>8} {'share':>6}")
    op_total = sum(totals.values())
    for bucket, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{bucket:<62} {seconds / steps * 1e3:8.2f} {seconds / op_total:6.1%}")
    for label, seconds in watch.seconds.items():
        print(f"{label:<62} {seconds / steps * 1e3:8.2f} {seconds / wall:6.1%} of wall")
    print(f"top {args.top} ops by self time (ms/step, calls/step):")
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {event.key:<48} {event.self_cpu_time_total / 1e3 / steps:8.2f} {event.count / steps:8.1f}")
    print(f"(op self-times add up to {op_total / steps * 1e3:.1f} ms/step; with {args.threads} threads an op's "
          "self time is wall time, not CPU time summed over threads)")


if __name__ == "__main__":
    main()
