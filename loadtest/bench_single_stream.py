"""Single-stream decode speed of each CPU weight precision, in one run (issue 23): `make bench-single-stream`.

The question: at batch 1, where decode reads every weight once per token, how many tokens per second does the
default model (SmolLM2-135M-Instruct) decode in-process through our engine, for each way of holding its weights:

- bf16 unpacked (aten mm; the path before issue 23), bf16 oneDNN-packed (server.model.packed_linear),
- fp32 oneDNN-packed,
- int8-wo and int4-wo (server.model.weight_only, requantized from the dequantized checkpoint),
- gguf (server.model.gguf_grid: the file's own Q4_1 blocks on the int4 kernel, the Q8_0 lm_head dense packed).

Each precision is loaded once; rounds alternate between them (the shared machine is noisy, so compare within one
run) and the best round counts. Printed: tok/s, ms/token, resident weight MiB and the ratio to bf16 unpacked.
bf16 packing where the CPU lacks native bf16 is skipped (packed_linear does not pack there).
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model.default_model import ensure_default_model
from server.model.loader import load_model
from server.model.packed_linear import packing_available

PRECISIONS = {  # name: (dtype, quantization, pack)
    "bf16": (torch.bfloat16, "none", False),
    "bf16-packed": (torch.bfloat16, "none", True),
    "fp32-packed": (torch.float32, "none", True),
    "int8-wo": (torch.bfloat16, "int8-wo", True),
    "int4-wo": (torch.bfloat16, "int4-wo", True),
    "gguf": (torch.bfloat16, "gguf", True),
}
PROMPT = "The history of the Roman Empire"


def decode_rate(engine: Engine, ids: list[int], tokens: int) -> float:
    """Decode tok/s of one greedy request: (tokens - 1) decode steps over their wall time (prefill excluded by
    timing from the first token's arrival)."""
    request = engine.make_request(ids, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    stamps: list[float] = []
    original = engine.step

    def step():
        original()
        if request.output_token_ids and len(stamps) < len(request.output_token_ids):
            stamps.append(time.perf_counter())

    engine.step = step
    try:
        engine.generate([request])
    finally:
        del engine.step
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only", nargs="*", choices=list(PRECISIONS), help="a subset of the precisions")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    path = ensure_default_model()
    engines, sizes = {}, {}
    for name in a.only or PRECISIONS:
        dtype, quantization, pack = PRECISIONS[name]
        if name == "bf16-packed" and not packing_available(torch.device("cpu"), dtype):
            print(f"{name}: skipped, this CPU has no native bf16 (bf16 is not packed here)")
            continue
        loaded = load_model(path, dtype=dtype, quantization=quantization, pack=pack, batch_hint=1)
        engines[name] = Engine(loaded, EngineConfig(max_batch=1, max_seq_len=256, max_adapter_slots=1))
        sizes[name] = loaded.weight_bytes / 2**20
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    best: dict[str, float] = {}
    for r in range(a.rounds):
        for name, engine in engines.items():  # the newest engine on a model owns it: one model per precision
            best[name] = max(best.get(name, 0.0), decode_rate(engine, ids, a.tokens))
        print(f"round {r + 1}: " + ", ".join(f"{n} {best[n]:.1f}" for n in engines), flush=True)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    ref = best.get("bf16")
    print(f"\n{cpu}, {a.threads} thread(s), {a.tokens} tokens, best of {a.rounds} rounds\n")
    print("| precision | tok/s | ms/token | weights MiB | vs bf16 unpacked |\n|---|---|---|---|---|")
    for name in engines:
        ratio = f"{best[name] / ref:.2f}x" if ref else "-"
        print(f"| {name} | {best[name]:.1f} | {1000 / best[name]:.1f} | {sizes[name]:.0f} | {ratio} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu, "threads": a.threads, "tokens": a.tokens, "tok_s": best, "weights_mib": sizes},
                      f, indent=2)


if __name__ == "__main__":
    main()
