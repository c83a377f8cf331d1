"""Engine decode throughput against HF `generate`, measured in the same run, and the KV write's cost.

Model: a ~134M-parameter Llama built from a config (hidden 768, 12 layers,
intermediate 2048, vocab 32000, random weights) and loaded from disk by our loader
like any checkpoint. Every request has a 16-token prompt and generates exactly
`--new-tokens` tokens (EOS ignored on both sides). Throughput is generated tokens
per second of wall time, prefill included, best of `--repeats`. The engine uses the
server's default `--max-seq-len` (EngineConfig).

KV micro-benchmark (`--kv-lens`, default S = 64 and 4096): ms per call of
`KVCache.write_and_read` (index_copy_ of the new tokens' vectors through block tables into
the paged pool, then the rows' gather) for a decode step (T=1) and a prefill chunk (T=128),
B=32 rows, the model's Hkv/D, one layer, against the first contiguous cache's write
(`Tensor.scatter_` into strided [B, Hkv, S, D] rows, read as a view).

    python -m loadtest.bench_engine [--batches 1 8] [--dtypes float32 bfloat16] [--kv-only]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.model import builtin
from server.model.kv_cache import KVCache
from server.model.loader import load_model, parse_dtype

log = logging.getLogger("bench_engine")


MODEL_CONFIG = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                    num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048)


def make_model_dir(root: Path) -> Path:
    """Write the ~134M benchmark model (random weights, std 0.02) with the built-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODEL_CONFIG)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer = builtin.build_tokenizer()
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(builtin._configs(tokenizer)["tokenizer_config.json"]))
    return root


def prompts(batch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(300, 32000, (batch, 16), generator=generator).tolist()


class HFGenerate:
    """HF `generate` on the base, greedy, exactly `new_tokens` per row; `seconds()` times one batch."""

    def __init__(self, path: Path, dtype: torch.dtype, ids: list[list[int]], new_tokens: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.ids, self.new_tokens = torch.tensor(ids), new_tokens
        self._generate(4)  # warm-up

    def _generate(self, new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def seconds(self) -> float:
        start = time.perf_counter()
        out = self._generate(self.new_tokens)
        elapsed = time.perf_counter() - start
        assert out.shape[1] == self.ids.shape[1] + self.new_tokens
        return elapsed


def bench_hf(path: Path, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int) -> float:
    hf = HFGenerate(path, dtype, prompts(batch), new_tokens)
    return batch * new_tokens / min(hf.seconds() for _ in range(repeats))


def bench_engine(path: Path, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int) -> float:
    loaded = load_model(path, dtype=dtype, batch_hint=batch)
    engine = Engine(loaded, EngineConfig(max_batch=batch))  # the server's default max_seq_len
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([Request(p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
                     for p in prompts(batch)])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        requests = [Request(p, params) for p in prompts(batch)]
        start = time.perf_counter()
        engine.generate(requests)
        best = min(best, time.perf_counter() - start)
        assert all(len(r.output_token_ids) == new_tokens for r in requests)
    return batch * new_tokens / best


def _old_scatter_write(rows_k: torch.Tensor, rows_v: torch.Tensor, cache_pos: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The write the contiguous cache did first: scatter_ into its strided [B, Hkv, S, D] rows."""
    b, hkv, t, d = k.shape
    index = cache_pos[:, None, :, None].expand(b, hkv, t, d)
    rows_k.scatter_(2, index, k.to(rows_k.dtype))
    rows_v.scatter_(2, index, v.to(rows_v.dtype))
    return rows_k[:, :, :kv_len], rows_v[:, :, :kv_len]


def _ms_per_call(fn, min_seconds: float, min_calls: int = 3, max_calls: int = 500) -> float:
    """Median ms per call, after one untimed call, over at least `min_calls` calls and `min_seconds`."""
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_calls and (len(samples) < min_calls or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def bench_kv_write(dtype: torch.dtype, seq_len: int, new_tokens: int, batch: int = 32,
                   min_seconds: float = 0.3) -> dict:
    """ms per KV write (and read back) of `new_tokens` tokens per row at the end of an S=`seq_len` row: ours
    (index_copy_ through block tables into the paged pool, then the rows' gather) vs the first contiguous
    cache's scatter_ into [B, Hkv, S, D] rows (a view read)."""
    hkv = MODEL_CONFIG["num_key_value_heads"]
    d = MODEL_CONFIG["hidden_size"] // MODEL_CONFIG["num_attention_heads"]
    t = min(new_tokens, seq_len)
    cache = KVCache(1, batch, hkv, seq_len, d, dtype)
    rows_k, rows_v = (torch.zeros(batch, hkv, seq_len, d, dtype=dtype) for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(batch, hkv, t, d, generator=gen).to(dtype) for _ in range(2))
    pos = torch.arange(seq_len - t, seq_len)[None, :].expand(batch, t).contiguous()
    tables = cache.tables_of_rows(slice(0, batch))
    ours = lambda: cache.write_and_read(0, tables, cache.flat_index(tables, pos), k, v, seq_len)  # noqa: E731
    old = lambda: _old_scatter_write(rows_k, rows_v, pos, k, v, seq_len)  # noqa: E731
    keys, _ = ours()
    old()
    assert torch.equal(keys, rows_k), "the two writes disagree"
    ours_ms, old_ms = _ms_per_call(ours, min_seconds), _ms_per_call(old, min_seconds)
    return {"dtype": str(dtype).removeprefix("torch."), "S": seq_len, "T": t, "B": batch, "Hkv": hkv, "D": d,
            "index_copy_ms": round(ours_ms, 4), "scatter_ms": round(old_ms, 4), "speedup": round(old_ms / ours_ms, 1)}


def kv_table(dtype_names: list[str], seq_lens: list[int], token_counts: list[int], min_seconds: float) -> list[dict]:
    rows = []
    for dtype_name in dtype_names:
        for seq_len in seq_lens:
            for tokens in token_counts:
                r = bench_kv_write(parse_dtype(dtype_name), seq_len, tokens, min_seconds=min_seconds)
                rows.append(r)
                what = "decode " if tokens == 1 else "prefill"
                print(f"KV write {r['dtype']:>8} {what} B={r['B']} Hkv={r['Hkv']} D={r['D']} S={seq_len:>5} "
                      f"T={r['T']:>3}: write_and_read (index_copy_) {r['index_copy_ms']:9.4f} ms | "
                      f"old scatter_ {r['scatter_ms']:9.3f} ms | {r['speedup']:7.1f}x", flush=True)
    return rows


def like_the_server(fn, *args, threads: int | None = None):
    """``fn(*args)`` in a thread of its own (with ``threads`` torch threads, else torch's default), with no
    torch op run in this thread before, as the server runs its engine: one OpenMP team in the process
    (server.engine.threads). A second team, e.g. this thread's after one matmul here, throttles every team's
    spin-wait: on this 2-core machine the engine ran 15% slower in such a process, and HF `generate` and
    PEFT's mixed batch (91 vs 155-165 tok/s) slower still, which is what this harness measured before
    2026-12-01 evening."""

    def run():
        if threads:
            torch.set_num_threads(threads)  # per thread under OpenMP: set where the work runs
        return fn(*args)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench") as pool:
        return pool.submit(run).result()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--kv-lens", type=int, nargs="*", default=[64, 4096],
                        help="cache lengths S of the KV write micro-benchmark (none: skip it)")
    parser.add_argument("--kv-tokens", type=int, nargs="+", default=[1, 128],
                        help="tokens per row written per call: 1 = a decode step, more = a prefill chunk")
    parser.add_argument("--kv-seconds", type=float, default=0.3, help="least time spent timing each KV case")
    parser.add_argument("--kv-only", action="store_true", help="only the KV write micro-benchmark")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    like_the_server(_run, args, threads=args.threads)


def _run(args) -> None:
    kv_rows = kv_table(args.dtypes, args.kv_lens, args.kv_tokens, args.kv_seconds) if args.kv_lens else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = None if args.kv_only else make_model_dir(Path(tmp))
        for dtype_name in [] if args.kv_only else args.dtypes:
            dtype = parse_dtype(dtype_name)
            for batch in args.batches:
                hf = bench_hf(path, dtype, batch, args.new_tokens, args.repeats)
                ours = bench_engine(path, dtype, batch, args.new_tokens, args.repeats)
                rows.append({"dtype": dtype_name, "batch": batch, "hf_tok_s": round(hf, 1),
                             "engine_tok_s": round(ours, 1), "ratio": round(ours / hf, 2)})
                print(f"{dtype_name:>9} batch {batch:>3}: HF generate {hf:8.1f} tok/s | engine {ours:8.1f} tok/s "
                      f"| ratio {ours / hf:5.2f}x", flush=True)
    print(f"\nthreads={torch.get_num_threads()} new_tokens={args.new_tokens} prompt=16 "
          f"torch={torch.__version__} cpu_capability={torch.backends.cpu.get_cpu_capability()}")
    if args.json:
        args.json.write_text(json.dumps({"engine": rows, "kv_write": kv_rows}, indent=2))


if __name__ == "__main__":
    main()
