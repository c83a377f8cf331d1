"""What a prompt chunk costs the decoding rows it joins: engine step times by what the step held.

On the ~134M Llama of bench_engine, in the dtype the server resolves here, at the server's default
flags except --max-batch 32 and --max-prefill-tokens C: `--rows` streams decode while one
`--long-tokens` prompt is prefilled in chunks of C beside them (one forward per step). Every step is
timed around `ModelRunner.run` and filed by what it held (decode rows, prompt-chunk tokens), so the
ratio "decode + chunk" / "decode alone" is the ITL ratio the served `--long-prompt` benchmark sees,
without HTTP. Also printed: the extra step time per chunk token, against the chunk's GEMM work
(2 flops per decoder-linear parameter per token) at the GEMM rate measured on this machine in the same run.

    python -m loadtest.profile_chunk [--chunks 8 16 32 64] [--rows 16] [--long-tokens 900]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from loadtest.bench_engine import MODEL_CONFIG, like_the_server, make_model_dir, prompts
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.factory import resolve
from server.engine.request import SamplingParams
from server.model.loader import load_model, parse_dtype


def gemm_gflops(dtype: torch.dtype, m: int = 32, k: int = 768, n: int = 3072, reps: int = 30) -> float:
    """A linear's throughput at M rows on this machine (the MLP's shape of the benchmark model)."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def timed_steps(engine: Engine) -> dict[tuple[int, int], list[float]]:
    """Wrap the runner: (decode rows sampled, prompt-chunk tokens) -> step seconds."""
    steps: dict[tuple[int, int], list[float]] = defaultdict(list)
    inner = engine.runner.run

    def run(plan, *args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(plan, *args, **kwargs)
        finally:
            rows = sum(plan.decode.sampled) if plan.decode else 0
            chunk = sum(len(c.token_ids) for group in plan.prefill for c in group)
            steps[(rows, chunk)].append(time.perf_counter() - start)

    engine.runner.run = run
    return steps


def measure(model_dir: Path, chunk: int, args) -> dict:
    config = resolve(replace(EngineConfig(), model=str(model_dir), max_batch=32, max_prefill_tokens=chunk))
    loaded = load_model(model_dir, dtype=parse_dtype(config.dtype), quantization=config.quantization, batch_hint=32)
    engine = Engine(loaded, config)
    streams = SamplingParams(max_tokens=args.stream_tokens, temperature=0.0, ignore_eos=True)
    generator = torch.Generator().manual_seed(2)
    long = torch.randint(300, 32000, (args.long_tokens,), generator=generator).tolist()
    engine.generate([engine.make_request(p, replace(streams, max_tokens=4)) for p in prompts(args.rows)])  # warm-up
    steps = timed_steps(engine)
    requests = [engine.make_request(p, streams) for p in prompts(args.rows)]
    requests.append(engine.make_request(long, SamplingParams(max_tokens=1, temperature=0.0)))
    engine.generate(requests)
    alone = steps.get((args.rows, 0), [])
    joined = [t for (rows, tokens), ts in steps.items() if rows == args.rows and tokens == chunk for t in ts]
    return {"chunk": chunk, "dtype": config.dtype, "alone_ms": 1e3 * statistics.median(alone),
            "joined_ms": 1e3 * statistics.median(joined), "joined_steps": len(joined), "alone_steps": len(alone),
            "joined_p90_ms": 1e3 * sorted(joined)[int(0.9 * (len(joined) - 1))]}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m loadtest.profile_chunk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=900)
    p.add_argument("--stream-tokens", type=int, default=200, help="long enough to outlast the long prefill")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / "model")
        c = MODEL_CONFIG  # the decoder linears a prompt token goes through (its logits are not computed)
        kv = c["hidden_size"] * c["num_key_value_heads"] // c["num_attention_heads"]
        params = c["num_hidden_layers"] * (c["hidden_size"] * (2 * c["hidden_size"] + 2 * kv)
                                           + 3 * c["hidden_size"] * c["intermediate_size"])

        def run():
            out = [measure(model_dir, c, args) for c in args.chunks]
            return out, gemm_gflops(parse_dtype(out[0]["dtype"]))

        results, gflops = like_the_server(run)
    print(f"{args.rows} decoding rows, a {args.long_tokens}-token prompt joining; {results[0]['dtype']}; "
          f"{params / 1e6:.0f}M decoder-linear parameters; GEMM at M=32 measured {gflops:.0f} GFLOP/s")
    print("| chunk | step alone ms | step with chunk ms (p50 / p90) | ratio | extra ms per chunk token | "
          "GEMM-bound estimate ms per token |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        extra = (r["joined_ms"] - r["alone_ms"]) / r["chunk"]
        print(f"| {r['chunk']} | {r['alone_ms']:.1f} | {r['joined_ms']:.1f} / {r['joined_p90_ms']:.1f} | "
              f"{r['joined_ms'] / r['alone_ms']:.2f} | {extra:.2f} | {2 * params / gflops / 1e6:.2f} |")
    return results


if __name__ == "__main__":
    main()
