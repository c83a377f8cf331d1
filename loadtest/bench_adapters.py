"""Adapter serving cost, measured in one run against baselines from the same run.

On the ~100M Llama of bench_engine (hidden 768, 12 layers, vocab 32000):
- every row a distinct LoRA (r=16 on q,k,v,o), IA3 (k, v, down) or prefix (16
  virtual tokens) adapter, vs base-only rows at the same batch;
- our engine vs PEFT's mixed-batch `generate(adapter_names=...)` on the same LoRAs;
- one hot LoRA adapter, merged into the base, vs base-only;
- cold load latency of one adapter from disk into a device slot (p50, p99).

Throughput is generated tokens per second, prefill included, with adapters already
resident (a warm-up pass loads them), best of `--repeats`.

    python -m loadtest.bench_adapters [--batches 16 32] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adapters.format import BaseSpec, load_adapter
from adapters.store import AdapterStore
from loadtest.bench_engine import make_model_dir, prompts
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model.adapter_layers import write_slot
from server.model.loader import load_model, parse_dtype
from tests.peft_adapters import make_ia3, make_lora, make_prefix, perturbed_copies

log = logging.getLogger("bench_adapters")
PROMPT_LEN = 16


def make_adapters(base: Path, root: Path, count: int) -> dict[str, list[Path]]:
    """`count` distinct adapters of each kind, in PEFT's format (one made by PEFT, the rest perturbed copies)."""
    kinds = {
        "lora": make_lora(base, root / "lora", seed=1, r=16),
        "ia3": make_ia3(base, root / "ia3", seed=2),
        "prefix": make_prefix(base, root / "prefix", seed=3, num_virtual_tokens=16),
    }
    return {kind: perturbed_copies(path, root / "copies", count, seed=i) for i, (kind, path) in enumerate(kinds.items())}


def engine_throughput(loaded, store: AdapterStore, batch: int, adapters: list[str | None], new_tokens: int,
                      repeats: int, merge: bool = False, threshold: float = 0.5) -> float:
    config = EngineConfig(max_batch=batch, max_seq_len=PROMPT_LEN + 16 + new_tokens + 1, max_adapter_slots=batch,
                          max_lora_rank=16, merge_threshold=threshold if merge else 2.0, unmerge_threshold=0.01,
                          merge_patience=1, merge_min_batch=1)
    engine = Engine(loaded, config, store=store)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def run() -> float:
        requests = [engine.make_request(p, params, adapter=a) for p, a in zip(prompts(batch), adapters)]
        start = time.perf_counter()
        engine.generate(requests)
        elapsed = time.perf_counter() - start
        assert all(len(r.output_token_ids) == new_tokens for r in requests)
        return elapsed

    run()  # warm-up: loads every adapter into its slot
    if merge:
        run()  # with every adapter resident all rows start together: the hot adapter merges and stays merged
        assert engine.adapters.merged_slot, "the hot adapter should be merged by now"
    return batch * new_tokens / min(run() for _ in range(repeats))


def peft_throughput(base: Path, lora_paths: list[Path], dtype: torch.dtype, batch: int, new_tokens: int,
                    repeats: int) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    names = [f"a{i}" for i in range(batch)]
    peft = PeftModel.from_pretrained(model, lora_paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], lora_paths[1:batch]):
        peft.load_adapter(path, adapter_name=name)
    peft.eval()
    ids = torch.tensor(prompts(batch))
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            if i:  # the first pass is a warm-up
                best = min(best, time.perf_counter() - start)
    assert out.shape[1] == PROMPT_LEN + new_tokens
    return batch * new_tokens / best


def cold_load_latency(loaded, paths: list[Path], dtype: torch.dtype) -> tuple[float, float]:
    """Seconds from reading an adapter's files to its weights sitting in a device slot (p50, p99)."""
    engine = Engine(loaded, EngineConfig(max_batch=1, max_seq_len=64, max_adapter_slots=1, max_lora_rank=16),
                    store=AdapterStore(Path(tempfile.mkdtemp())))
    base = BaseSpec.from_hf_config(loaded.hf_config, loaded.name)
    layers = engine.adapters.layers
    samples = []
    for path in paths:
        start = time.perf_counter()
        adapter = load_adapter(path, base, max_rank=16, dtype=dtype)
        write_slot(layers, 1, adapter)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]


def merge_sweep(loaded, store: AdapterStore, batch: int, lora_names: list[str], args) -> list[dict]:
    """Throughput with k of `batch` rows on one hot LoRA (the rest distinct LoRAs), unmerged vs merged."""
    rows = []
    for hot_rows in sorted({batch // 4, batch // 2, (3 * batch) // 4, (7 * batch) // 8, batch}):
        adapters = [lora_names[0]] * hot_rows + lora_names[1:1 + batch - hot_rows]
        share = hot_rows / batch
        plain = engine_throughput(loaded, store, batch, adapters, args.new_tokens, args.repeats)
        merged = engine_throughput(loaded, store, batch, adapters, args.new_tokens, args.repeats, merge=True,
                                   threshold=share)
        rows.append({"hot_share": share, "unmerged_tok_s": round(plain, 1), "merged_tok_s": round(merged, 1),
                     "merged_vs_unmerged": round(merged / plain, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true", help="leave out the PEFT peer (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--merge-sweep", action="store_true",
                        help="also measure merged vs unmerged throughput as the hot adapter's share of rows varies "
                             "(how the default --merge-threshold was chosen)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    results: dict = {"dtype": args.dtype, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                     "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_model_dir(root / "model")
        paths = make_adapters(base, root / "adapters", max(args.batches))
        store = AdapterStore(root / "store")
        names: dict[str, list[str]] = {}
        for kind, kind_paths in paths.items():
            names[kind] = [f"{kind}-{i}" for i in range(len(kind_paths))]
            for name, path in zip(names[kind], kind_paths):
                store.add(name, path)
        loaded = load_model(base, dtype=dtype, batch_hint=max(args.batches))
        for batch in args.batches:
            base_tps = engine_throughput(loaded, store, batch, [None] * batch, args.new_tokens, args.repeats)
            row = {"batch": batch, "base_tok_s": round(base_tps, 1)}
            for kind in ("lora", "ia3", "prefix"):
                tps = engine_throughput(loaded, store, batch, names[kind][:batch], args.new_tokens, args.repeats)
                row[f"{kind}_tok_s"], row[f"{kind}_vs_base"] = round(tps, 1), round(tps / base_tps, 3)
            merged = engine_throughput(loaded, store, batch, [names["lora"][0]] * batch, args.new_tokens,
                                       args.repeats, merge=True)
            row["merged_tok_s"], row["merged_vs_base"] = round(merged, 1), round(merged / base_tps, 3)
            if not args.skip_peft:
                peft = peft_throughput(base, paths["lora"], dtype, batch, args.new_tokens, args.repeats)
                row["peft_lora_tok_s"], row["ours_vs_peft"] = round(peft, 1), round(row["lora_tok_s"] / peft, 2)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        if args.merge_sweep:
            results["merge_sweep"] = merge_sweep(loaded, store, max(args.batches), names["lora"], args)
        p50, p99 = cold_load_latency(loaded, paths["lora"], dtype)
        results["cold_load_ms"] = {"p50": round(p50 * 1e3, 2), "p99": round(p99 * 1e3, 2)}
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _table(results: dict) -> str:
    lines = [f"dtype={results['dtype']} new_tokens={results['new_tokens']} threads={results['threads']}",
             "| batch | base tok/s | LoRA/base | IA3/base | prefix/base | merged/base | ours/PEFT |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['batch']} | {r['base_tok_s']} | {r['lora_vs_base']} | {r['ia3_vs_base']} | "
                     f"{r['prefix_vs_base']} | {r['merged_vs_base']} | {r.get('ours_vs_peft', '-')} |")
    for r in results.get("merge_sweep", []):
        lines.append(f"hot share {r['hot_share']:.2f}: merged/unmerged {r['merged_vs_unmerged']}")
    cold = results["cold_load_ms"]
    lines.append(f"cold load of one LoRA adapter, disk -> slot: p50 {cold['p50']} ms, p99 {cold['p99']} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
