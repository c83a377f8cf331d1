"""Engine decode throughput against HF `generate`, measured in the same run.

Model: a ~100M-parameter Llama built from a config (hidden 768, 12 layers,
intermediate 2048, vocab 32000, random weights) and loaded from disk by our loader
like any checkpoint. Every request has a 16-token prompt and generates exactly
`--new-tokens` tokens (EOS ignored on both sides). Throughput is generated tokens
per second of wall time, prefill included, best of `--repeats`.

    python -m loadtest.bench_engine [--batches 1 8] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.model import builtin
from server.model.loader import load_model, parse_dtype

log = logging.getLogger("bench_engine")


def make_model_dir(root: Path) -> Path:
    """Write the ~100M benchmark model (random weights, std 0.02) with the built-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer = builtin.build_tokenizer()
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(builtin._configs(tokenizer)["tokenizer_config.json"]))
    return root


def prompts(batch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(300, 32000, (batch, 16), generator=generator).tolist()


def bench_hf(path: Path, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor(prompts(batch))
    best = float("inf")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
            best = min(best, time.perf_counter() - start)
    assert out.shape[1] == 16 + new_tokens
    return batch * new_tokens / best


def bench_engine(path: Path, dtype: torch.dtype, batch: int, new_tokens: int, repeats: int) -> float:
    loaded = load_model(path, dtype=dtype, batch_hint=batch)
    engine = Engine(loaded, EngineConfig(max_batch=batch, max_seq_len=16 + new_tokens + 8))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir(Path(tmp))
        for dtype_name in args.dtypes:
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
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
