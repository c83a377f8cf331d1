"""What do distinct bottleneck adapters cost when served, against base rows and against distinct LoRAs?

One engine, one batch of `--batch` rows (default 32) on the ~134M Llama of bench_engine (hidden 768, 12
layers), every row a distinct adapter of one variant, timed in interleaved rounds (bench_adapters.interleaved,
order rotated per round; a ratio is the median over rounds of base time / variant time):

- base: no adapter;
- lora: r=16 on q, k, v, o (PEFT format, bench_adapters' factory);
- houlsby: AdapterHub double_seq_bn, reduction 16 (width 48), swish, after attention and after the MLP;
- pfeiffer: seq_bn, reduction 16, relu, after the MLP;
- parallel: par_bn, reduction 16, relu, scaling 4, after the MLP;
- unipelt: AdapterHub UniPELT (adapters.kinds.unipelt): a gated flat prefix of 10, a gated seq_bn (reduction 16)
  and gated LoRA r 8 on q and v; its rows' attention runs in torch (the decode kernel has no gate).

Bottleneck weights are random (the cost does not depend on them), written in the library's save format.

    python -m loadtest.bench_bottleneck [--batch 32] [--new-tokens 16] [--rounds 3] [--dtype float32]
                                        [--variants base,lora,houlsby,pfeiffer,parallel,unipelt]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.store import AdapterStore
from loadtest.adapters_gen import AdapterFactory
from loadtest.bench_adapters import interleaved, ratio_to
from loadtest.bench_engine import like_the_server, make_model_dir, prompts
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model.loader import load_model, parse_dtype

VARIANTS = {  # AdapterHub presets (adapters 1.3.0), reduction factor 16 for all three
    "houlsby": {"mh_adapter": True, "output_adapter": True, "non_linearity": "swish", "original_ln_before": False,
                "is_parallel": False, "scaling": 1.0},
    "pfeiffer": {"mh_adapter": False, "output_adapter": True, "non_linearity": "relu", "original_ln_before": True,
                 "is_parallel": False, "scaling": 1.0},
    "parallel": {"mh_adapter": False, "output_adapter": True, "non_linearity": "relu", "original_ln_before": False,
                 "is_parallel": True, "scaling": 4.0},
}
REDUCTION = 16


def write_bottleneck(out: Path, model_dir: Path, variant: str, seed: int) -> Path:
    """One AdapterHub bottleneck adapter dir (adapter_config.json + adapter.safetensors) with random weights."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    bn = {"architecture": "bottleneck", "reduction_factor": REDUCTION, "ln_before": False, "ln_after": False,
          "residual_before_ln": True, "original_ln_after": True, **VARIANTS[variant]}
    width = hidden // REDUCTION
    places = [p for p, flag in (("attention", "mh_adapter"), ("output", "output_adapter")) if bn[flag]]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for place in places:
            key = f"model.layers.{i}.{place}_adapters.adapters.{variant}"
            tensors[f"{key}.adapter_down.0.weight"] = torch.randn(width, hidden, generator=g) * 0.05
            tensors[f"{key}.adapter_down.0.bias"] = torch.randn(width, generator=g) * 0.05
            tensors[f"{key}.adapter_up.weight"] = torch.randn(hidden, width, generator=g) * 0.05
            tensors[f"{key}.adapter_up.bias"] = torch.randn(hidden, generator=g) * 0.05
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "config": bn, "hidden_size": hidden, "model_class": "LlamaForCausalLM", "model_type": cfg["model_type"],
        "name": variant, "version": "adapters.1.3.0"}))
    save_file(tensors, str(out / "adapter.safetensors"))
    return out


def write_unipelt(out: Path, model_dir: Path, seed: int, prefix_length: int = 10, r: int = 8) -> Path:
    """One UniPELT dir as ``adapterctl convert`` leaves the library's save (flat prefix), random weights."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = hidden // heads
    bn = {"reduction_factor": REDUCTION, "ln_before": False, "ln_after": False, "residual_before_ln": True,
          "original_ln_after": True, **VARIANTS["pfeiffer"], "use_gating": True}
    prefix = {"architecture": "prefix_tuning", "flat": True, "prefix_length": prefix_length, "use_gating": True,
              "shared_gating": True}
    lora = {"architecture": "lora", "r": r, "alpha": 2, "attn_matrices": ["q", "v"], "use_gating": True}
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    flat = rand(prefix_length * layers * 2 * kv_heads * head_dim)
    tensors = {"model.prefix_tuning.prefix_tunings.u.self_prefix.control_trans": flat}
    width = hidden // REDUCTION
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.prefix_tuning.pool.prefix_tunings.u.self_prefix.control_trans"] = flat
        tensors[f"model.layers.{i}.self_attn.prefix_tuning.prefix_gates.u.weight"] = rand(1, hidden)
        tensors[f"model.layers.{i}.self_attn.prefix_tuning.prefix_gates.u.bias"] = rand(1)
        key = f"model.layers.{i}.output_adapters.adapters.u"
        for name, shape in (("adapter_down.0.weight", (width, hidden)), ("adapter_down.0.bias", (width,)),
                            ("adapter_up.weight", (hidden, width)), ("adapter_up.bias", (hidden,)),
                            ("gate.weight", (1, hidden)), ("gate.bias", (1,))):
            tensors[f"{key}.{name}"] = rand(*shape)
        for module, out_features in (("q_proj", heads * head_dim), ("v_proj", kv_heads * head_dim)):
            key = f"model.layers.{i}.self_attn.{module}.loras.u"
            for name, shape in (("lora_A", (r, hidden)), ("lora_B", (out_features, r)), ("gate.weight", (1, hidden)),
                                ("gate.bias", (1,))):
                tensors[f"{key}.{name}"] = rand(*shape)
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "config": {"architecture": "union", "configs": [prefix, bn, lora]}, "hidden_size": hidden,
        "model_class": "LlamaForCausalLM", "model_type": cfg["model_type"], "name": "u", "version": "adapters.1.3.0"}))
    save_file({k: v.clone() for k, v in tensors.items()}, str(out / "adapter.safetensors"))
    return out


class Timed:
    """bench_adapters.TimedEngine's `seconds` on an engine whose slots fit the bottleneck width (48)."""

    def __init__(self, loaded, store: AdapterStore, batch: int, new_tokens: int, width: int):
        config = EngineConfig(max_batch=batch, max_adapter_slots=batch, max_lora_rank=width, merge_threshold=2.0)
        self.engine, self.batch, self.new_tokens = Engine(loaded, config, store=store), batch, new_tokens

    def seconds(self, adapters: list[str | None], merge: bool = False) -> float:
        import time

        params = SamplingParams(max_tokens=self.new_tokens, temperature=0.0, ignore_eos=True)
        requests = [self.engine.make_request(p, params, adapter=a) for p, a in zip(prompts(self.batch), adapters)]
        start = time.perf_counter()
        self.engine.generate(requests)
        elapsed = time.perf_counter() - start
        assert all(len(r.output_token_ids) == self.new_tokens for r in requests)
        return elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--variants", default="base,lora,houlsby,pfeiffer,parallel,unipelt",
                   help="comma-separated subset of base,lora,houlsby,pfeiffer,parallel,unipelt")
    args = p.parse_args(argv)
    like_the_server(_run, args)


def _run(args) -> None:
    dtype = parse_dtype(args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench-bottleneck-") as tmp:
        root = Path(tmp)
        model_dir = make_model_dir(root / "model")
        store = AdapterStore(root / "store")
        factory = AdapterFactory(model_dir, root / "peft", rank=16, prefix_tokens=16, seed=1)
        wanted = args.variants.split(",")
        variants: dict[str, list[str | None]] = {"base": [None] * args.batch, "lora": []}
        for i in range(args.batch):
            store.add(f"lora-{i}", factory.get("lora", i).path)
            variants["lora"].append(f"lora-{i}")
        for variant in [*VARIANTS, "unipelt"]:
            variants[variant] = []
            for i in range(args.batch if variant in wanted else 0):
                write = (lambda out: write_unipelt(out, model_dir, i)) if variant == "unipelt" else (
                    lambda out: write_bottleneck(out, model_dir, variant, i))
                store.add(f"{variant}-{i}", write(root / "hub" / f"{variant}-{i}"))
                variants[variant].append(f"{variant}-{i}")
        variants = {n: v for n, v in variants.items() if n in wanted or n in ("base", "lora")}
        loaded = load_model(model_dir, dtype=dtype)
        hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        timed = Timed(loaded, store, args.batch, args.new_tokens, max(16, hidden // REDUCTION))
        times = interleaved(timed, variants, args.rounds)
    tokens = args.batch * args.new_tokens
    results = {"cpu": torch.backends.cpu.get_cpu_capability(), "dtype": args.dtype, "batch": args.batch,
               "new_tokens": args.new_tokens, "rounds": args.rounds,
               "tok_s": {n: round(tokens / min(t), 1) for n, t in times.items()},
               "vs_base": {n: round(ratio_to(times, n), 3) for n in times},
               "vs_lora": {n: round(ratio_to(times, n, "lora"), 3) for n in times}}
    print(f"{args.batch} distinct adapters per variant, {args.new_tokens} new tokens, {args.dtype}, "
          f"{args.rounds} rounds (tok/s best round; ratio = median of baseline time / variant time):")
    for name in times:
        print(f"  {name:9s} {results['tok_s'][name]:8.1f} tok/s   x{results['vs_base'][name]:.3f} of base   "
              f"x{results['vs_lora'][name]:.3f} of lora")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
