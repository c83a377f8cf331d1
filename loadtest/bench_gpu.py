"""Engine throughput on one CUDA GPU: a 0.50B NF4 Llama at batch 64, base rows vs 64 distinct LoRAs.

Model: built from a config (hidden 1024, 24 layers, intermediate 4864, GQA 16/8 heads,
vocab 32000, untied embeddings: 500M parameters, random weights), written to disk and
loaded by our loader like any checkpoint, decoder linears quantized to NF4, compute bf16.
Adapters: LoRA r=16 on q,k,v,o in PEFT's format (loadtest.adapters_gen), resident in slots.

Variants, each `--batch` rows of a `--prompt-len`-token prompt generating exactly
`--new-tokens` tokens (prefill included, EOS ignored), interleaved over `--rounds` rounds
(median seconds per variant):
- base: no adapter;
- 1 LoRA: every row the same LoRA (the uniform path: two plain matmuls per layer);
- 64 LoRAs: every row its own LoRA, through the Triton SGMV kernels (server/model/triton_ops);
- 64 LoRAs, torch: the same rows with Triton switched off (gather each row's factors + bmm).

    python -m loadtest.bench_gpu [--batch 64] [--new-tokens 64] [--rounds 3] [--json out.json]

Without CUDA it prints a message and exits 0. scripts/gpu_check.sh runs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=16,
                    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


def make_model_dir(root: Path, layers: int) -> tuple[Path, int]:
    """Write the benchmark model (random weights, std 0.02, bf16 safetensors); returns (path, parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.model import builtin

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is far faster on the GPU
        model = LlamaForCausalLM(LlamaConfig(**{**MODEL_CONFIG, "num_hidden_layers": layers})).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root)
    tokenizer = builtin.build_tokenizer()
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(builtin._configs(tokenizer)["tokenizer_config.json"]))
    return root, params


def prompts(batch: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(300, MODEL_CONFIG["vocab_size"], (batch, length), generator=generator).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--layers", type=int, default=MODEL_CONFIG["num_hidden_layers"])
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (use --layers 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure (skipped)")
        return 0
    logging.basicConfig(level=logging.WARNING)
    from adapters.store import AdapterStore
    from loadtest.adapters_gen import AdapterFactory
    from server.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams
    from server.model import adapter_ops
    from server.model.loader import load_model

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, params = make_model_dir(root / "model", args.layers)
        factory = AdapterFactory(base, root / "adapters", rank=16, seed=1)
        store = AdapterStore(root / "store")
        names = []
        for i in range(args.batch):
            spec = factory.get("lora", i)
            store.add(spec.name, spec.path)
            names.append(spec.name)
        loaded = load_model(base, dtype=torch.bfloat16, quantization=args.quantization, device=args.device,
                            batch_hint=args.batch)
        config = EngineConfig(max_batch=args.batch, max_seq_len=args.prompt_len + args.new_tokens + 16,
                              max_adapter_slots=args.batch, max_lora_rank=16, merge_threshold=2.0, device=args.device,
                              max_prefill_tokens=args.batch * args.prompt_len)
        engine = Engine(loaded, config, device=args.device, store=store)
        many = f"{args.batch} LoRAs"
        variants = {"base": [None] * args.batch, "1 LoRA": [names[0]] * args.batch, many: names,
                    f"{many}, torch": names}
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        ids = prompts(args.batch, args.prompt_len)

        def seconds(variant: str) -> float:
            sampling = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
            requests = [engine.make_request(p, sampling, adapter=a) for p, a in zip(ids, variants[variant])]
            triton_ops = adapter_ops._triton
            if variant.endswith("torch"):
                adapter_ops._triton = False
            try:
                sync()
                start = time.perf_counter()
                engine.generate(requests)
                sync()
                elapsed = time.perf_counter() - start
            finally:
                adapter_ops._triton = triton_ops
            assert all(len(r.output_token_ids) == args.new_tokens for r in requests)
            return elapsed

        for variant in variants:  # warm-up: loads adapters into slots, compiles the kernels
            seconds(variant)
        times: dict[str, list[float]] = {v: [] for v in variants}
        order = list(variants)
        for r in range(args.rounds):
            for variant in order[r % len(order):] + order[:r % len(order)]:
                times[variant].append(seconds(variant))
        triton_used = bool(adapter_ops._triton)
    tokens = args.batch * args.new_tokens
    base_s = statistics.median(times["base"])
    rows = [{"variant": v, "tok_s": round(tokens / statistics.median(t), 1),
             "vs_base": round(base_s / statistics.median(t), 3)} for v, t in times.items()]
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    results = {"gpu": gpu, "torch": torch.__version__, "triton_kernels": triton_used, "params": params,
               "quantization": args.quantization, "batch": args.batch, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows,
               "wall_s": round(time.perf_counter() - started, 1)}
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _table(results: dict) -> str:
    lines = [f"{results['gpu']}, torch {results['torch']}, Triton kernels: {results['triton_kernels']}; "
             f"Llama {results['params'] / 1e9:.2f}B {results['quantization']} bf16, batch {results['batch']}, "
             f"prompt {results['prompt_len']} + {results['new_tokens']} new tokens, median of {results['rounds']} "
             f"rounds (wall {results['wall_s']} s)",
             "| variant | tok/s | vs base |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['tok_s']} | {r['vs_base']} |" for r in results["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
