"""Adapter serving cost, measured in one run against baselines from the same run.

On the ~134M Llama of bench_engine (hidden 768, 12 layers, vocab 32000):
- every row a distinct LoRA (r=16 on q,k,v,o), IA3 (k, v, down) or prefix (16
  virtual tokens) adapter, vs base-only rows at the same batch;
- one hot LoRA adapter, merged into the base, vs base-only;
- our engine vs PEFT's mixed-batch `generate(adapter_names=...)` on the same LoRAs;
- cold load latency of one adapter from disk into a device slot (p50, p99).

Throughput is generated tokens per second, prefill included, with adapters already
resident, and the KV cache as long as the server's default --max-seq-len. This machine's
speed drifts by 10% or more between runs a minute apart, so the variants are
interleaved: each round times base, LoRA, IA3, prefix, merged (back to back on one
engine) and the PEFT peer, in an order rotated per round, and a ratio is the median
over rounds of (baseline time / variant time) within the round.

    python -m loadtest.bench_adapters [--batches 16 32] [--dtype bfloat16] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapters.format import BaseSpec, load_adapter
from adapters.store import AdapterStore
from loadtest.adapters_gen import AdapterFactory
from loadtest.bench_engine import like_the_server, make_model_dir, prompts
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model.adapter_layers import write_slot
from server.model.loader import load_model, parse_dtype

log = logging.getLogger("bench_adapters")
KINDS = ("lora", "ia3", "prefix")


def make_adapters(base: Path, root: Path, count: int) -> dict[str, list[Path]]:
    """`count` distinct adapters of each kind in PEFT's format (a PEFT-made template per kind, redrawn weights):
    LoRA r=16 on q,k,v,o; IA3 on k, v, down (feed-forward); prefix tuning with 16 virtual tokens."""
    factory = AdapterFactory(base, root, rank=16, prefix_tokens=16, seed=1)
    return {kind: [factory.get(kind, i).path for i in range(count)] for kind in KINDS}


class TimedEngine:
    """One engine holding every adapter of the benchmark in its slots; times whole batches.

    Only runs with `merge=True` consult its merge policy, which merges an adapter
    holding at least `merge_threshold` of the rows after one step and unmerges it at
    the first step where it holds none; `unmerge()` forces that step outside the clock.
    """

    def __init__(self, loaded, store: AdapterStore, batch: int, slots: int, new_tokens: int,
                 merge_threshold: float = 0.5):
        # max_seq_len: the server's default (EngineConfig), as served
        config = EngineConfig(max_batch=batch, max_adapter_slots=slots, max_lora_rank=16,
                              merge_threshold=merge_threshold, unmerge_threshold=min(0.01, merge_threshold),
                              merge_patience=1, merge_min_batch=1)
        self.engine = Engine(loaded, config, store=store)
        self.batch, self.new_tokens, self.merge_threshold = batch, new_tokens, merge_threshold

    def seconds(self, adapters: list[str | None], merge: bool = False) -> float:
        params = SamplingParams(max_tokens=self.new_tokens, temperature=0.0, ignore_eos=True)
        requests = [self.engine.make_request(p, params, adapter=a) for p, a in zip(prompts(self.batch), adapters)]
        pool = self.engine.adapters
        policy, pool.merge_policy = pool.merge_policy, pool.merge_policy if merge else None
        try:
            start = time.perf_counter()
            self.engine.generate(requests)
            elapsed = time.perf_counter() - start
        finally:
            pool.merge_policy = policy
        assert all(len(r.output_token_ids) == self.new_tokens for r in requests)
        return elapsed

    @property
    def merged(self) -> bool:
        return bool(self.engine.adapters.merged_slot)

    def unmerge(self) -> None:
        """A few tokens of base-only rows: the first decode step that leaves them running unmerges."""
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        pool = self.engine.adapters
        pool.merge_policy.merge_threshold = 2.0  # so that nothing merges again on the way
        try:
            self.engine.generate([self.engine.make_request(p, params) for p in prompts(self.batch)])
        finally:
            pool.merge_policy.merge_threshold = self.merge_threshold
        assert not self.merged


def interleaved(timed: TimedEngine, variants: dict[str, list[str | None]], rounds: int, merged: str | None = None,
                peers: dict[str, Callable[[], float]] | None = None) -> dict[str, list[float]]:
    """Seconds per variant per round. Every variant runs once untimed first (loading its adapters).
    Only the `merged` variant may merge: it also runs once untimed before each timed run, so its
    merge is in place when the clock starts, and is unmerged after. `peers` (name -> a function
    that times one run of another system) take their turns in the same rounds."""
    peers = peers or {}
    for adapters in variants.values():
        timed.seconds(adapters)
    names = list(variants) + list(peers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in peers:
                times[name].append(peers[name]())
                continue
            if name == merged:
                timed.seconds(variants[name], merge=True)
                assert timed.merged, "the hot adapter should be merged by now"
            times[name].append(timed.seconds(variants[name], merge=name == merged))
            if name == merged:
                assert timed.merged, "the hot adapter stayed merged while timed"
                timed.unmerge()
    return times


def ratio_to(times: dict[str, list[float]], name: str, baseline: str = "base") -> float:
    """Median over rounds of baseline time / variant time (> 1: the variant is faster)."""
    return statistics.median(b / v for b, v in zip(times[baseline], times[name]))


class PeftPeer:
    """PEFT's mixed-batch generate with one distinct LoRA per row, on HF transformers; `seconds()` times one run."""

    def __init__(self, base: Path, lora_paths: list[Path], dtype: torch.dtype, batch: int, new_tokens: int,
                 ids: list[list[int]] | None = None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        self.names = [f"a{i}" for i in range(batch)]
        self.peft = PeftModel.from_pretrained(model, lora_paths[0], adapter_name=self.names[0])
        for name, path in zip(self.names[1:], lora_paths[1:batch]):
            self.peft.load_adapter(path, adapter_name=name)
        self.peft.eval()
        self.ids = torch.tensor(prompts(batch) if ids is None else ids)
        self.new_tokens = new_tokens
        self.seconds()  # warm-up

    def seconds(self) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.peft.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids),
                                     adapter_names=self.names, max_new_tokens=self.new_tokens,
                                     min_new_tokens=self.new_tokens, do_sample=False, pad_token_id=0)
            elapsed = time.perf_counter() - start
        assert out.shape[1] == self.ids.shape[1] + self.new_tokens
        return elapsed


def cold_load_latency(loaded, paths: list[Path], dtype: torch.dtype) -> tuple[float, float]:
    """Seconds from reading an adapter's files to its weights sitting in a device slot (p50, p99)."""
    engine = Engine(loaded, EngineConfig(max_batch=1, max_adapter_slots=1, max_lora_rank=16),
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
    """Throughput with k of `batch` rows on one hot LoRA (the rest distinct LoRAs), merged vs unmerged,
    interleaved on one engine."""
    rows = []
    for hot_rows in sorted({batch // 4, batch // 2, (3 * batch) // 4, (7 * batch) // 8, batch}):
        share = hot_rows / batch
        adapters = [lora_names[0]] * hot_rows + lora_names[1:1 + batch - hot_rows]
        timed = TimedEngine(loaded, store, batch, batch, args.new_tokens, merge_threshold=share)
        times = interleaved(timed, {"unmerged": adapters, "merged": adapters}, args.rounds, merged="merged")
        rows.append({"hot_share": share,
                     "unmerged_tok_s": round(batch * args.new_tokens / statistics.median(times["unmerged"]), 1),
                     "merged_tok_s": round(batch * args.new_tokens / statistics.median(times["merged"]), 1),
                     "merged_vs_unmerged": round(ratio_to(times, "merged", baseline="unmerged"), 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size (medians)")
    parser.add_argument("--skip-peft", action="store_true", help="leave out the PEFT peer (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--merge-sweep", action="store_true",
                        help="also measure merged vs unmerged throughput at the first batch size as the hot "
                             "adapter's share of rows varies (how the default --merge-threshold was chosen)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    like_the_server(_run, args, threads=args.threads)


def _run(args) -> None:
    dtype = parse_dtype(args.dtype)
    results: dict = {"dtype": args.dtype, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                     "rounds": args.rounds, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_model_dir(root / "model")
        paths = make_adapters(base, root / "adapters", max(args.batches) + 1)
        store = AdapterStore(root / "store")
        names: dict[str, list[str]] = {}
        for kind, kind_paths in paths.items():
            names[kind] = [f"{kind}-{i}" for i in range(len(kind_paths))]
            for name, path in zip(names[kind], kind_paths):
                store.add(name, path)
        loaded = load_model(base, dtype=dtype, batch_hint=max(args.batches))
        for batch in args.batches:
            hot = names["lora"][batch]  # an adapter of its own: the LoRA rows never share a slot with the merged one
            variants = {"base": [None] * batch, **{kind: names[kind][:batch] for kind in KINDS},
                        "merged": [hot] * batch}
            timed = TimedEngine(loaded, store, batch, slots=3 * batch + 1, new_tokens=args.new_tokens)
            peers = {} if args.skip_peft else {
                "peft": PeftPeer(base, paths["lora"][:batch], dtype, batch, args.new_tokens).seconds}
            times = interleaved(timed, variants, args.rounds, merged="merged", peers=peers)
            row = {"batch": batch, "seconds_per_round": {name: [round(t, 3) for t in ts] for name, ts in times.items()}}
            for name in variants:
                row[f"{name}_tok_s"] = round(batch * args.new_tokens / statistics.median(times[name]), 1)
                if name != "base":
                    row[f"{name}_vs_base"] = round(ratio_to(times, name), 3)
            if peers:  # our LoRA rows vs PEFT's, per round
                row["peft_lora_tok_s"] = round(batch * args.new_tokens / statistics.median(times["peft"]), 1)
                row["ours_vs_peft"] = round(ratio_to(times, "lora", baseline="peft"), 2)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        if args.merge_sweep:
            results["merge_sweep"] = merge_sweep(loaded, store, args.batches[0], names["lora"], args)
        p50, p99 = cold_load_latency(loaded, paths["lora"], dtype)
        results["cold_load_ms"] = {"p50": round(p50 * 1e3, 2), "p99": round(p99 * 1e3, 2)}
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _table(results: dict) -> str:
    header = (f"dtype={results['dtype']} new_tokens={results['new_tokens']} threads={results['threads']} "
              f"rounds={results['rounds']} (ratios: median over rounds)")
    lines = [header,
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
