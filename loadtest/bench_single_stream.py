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

`--against REF` (a git commit, e.g. the one before a change) asks instead: how much faster is this tree than REF?
REF is exported (`git archive`) to a temporary directory, its CPU kernels built in a directory of their own, and
rounds alternate between a process of REF and one of this tree (one round each, `--rounds` times, REF first in
odd rounds), so both see the same load; both run this tree's copy of this file. Printed: each round's tok/s and
the process's CPU ms per decoded token (the work, which a loaded machine stretches less than the wall time), the
medians of within-round ratios, and the load average.

    python -m loadtest.bench_single_stream --against 9427378 --only gguf bf16-packed int8-wo --rounds 4
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def decode_rate(engine: Engine, ids: list[int], tokens: int, cpu_ms: list[float] | None = None) -> float:
    """Decode tok/s of one greedy request: (tokens - 1) decode steps over their wall time (prefill excluded by
    timing from the first token's arrival). cpu_ms, if given, gets the process's CPU ms (all threads) per decoded
    token: the work a token costs, which other processes on a loaded machine stretch less than its wall time."""
    request = engine.make_request(ids, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    stamps: list[tuple[float, float]] = []
    original = engine.step

    def step():
        original()
        if request.output_token_ids and len(stamps) < len(request.output_token_ids):
            stamps.append((time.perf_counter(), time.process_time()))

    engine.step = step
    try:
        engine.generate([request])
    finally:
        del engine.step
    if cpu_ms is not None:
        cpu_ms.append((stamps[-1][1] - stamps[0][1]) / (len(stamps) - 1) * 1e3)
    return (len(stamps) - 1) / (stamps[-1][0] - stamps[0][0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only", nargs="*", choices=list(PRECISIONS), help="a subset of the precisions")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--against", metavar="REF", help="alternate rounds against git commit REF (see the docstring)")
    a = p.parse_args(argv)
    if a.against:
        against(a)
        return
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
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():  # warm-up: the CPU kernels load at their first call (which --against's
        decode_rate(engine, ids, 3)   # one-round processes would otherwise time), caches fill
    for r in range(a.rounds):
        for name, engine in engines.items():  # the newest engine on a model owns it: one model per precision
            best[name] = max(best.get(name, 0.0), decode_rate(engine, ids, a.tokens, cpu[name]))
        print(f"round {r + 1}: " + ", ".join(f"{n} {best[n]:.1f}" for n in engines), flush=True)
    with open("/proc/cpuinfo") as f:
        cpu_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    ref = best.get("bf16")
    print(f"\n{cpu_name}, {a.threads} thread(s), {a.tokens} tokens, best of {a.rounds} rounds\n")
    print("| precision | tok/s | ms/token | weights MiB | vs bf16 unpacked |\n|---|---|---|---|---|")
    for name in engines:
        ratio = f"{best[name] / ref:.2f}x" if ref else "-"
        print(f"| {name} | {best[name]:.1f} | {1000 / best[name]:.1f} | {sizes[name]:.0f} | {ratio} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu_name, "threads": a.threads, "tokens": a.tokens, "tok_s": best, "weights_mib": sizes,
                       "cpu_ms_per_token": {n: min(v) for n, v in cpu.items()}}, f, indent=2)


def against(a) -> None:
    """Rounds alternating between a process of git commit a.against and one of this tree (module docstring)."""
    here = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "rev-parse", "--short", a.against], cwd=here, check=True, capture_output=True,
                         text=True).stdout.strip()
    ext_root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(tempfile.gettempdir()) / "torch_extensions")
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / sha
        ref.mkdir()
        archive = subprocess.run(["git", "archive", sha], cwd=here, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
        (ref / "loadtest" / Path(__file__).name).write_text(Path(__file__).read_text())  # one measuring code
        trees = {f"{sha} (before)": (ref, ext_root / f"ref-{sha}"), "this tree": (here, ext_root)}
        rates: dict[str, list[dict]] = {label: [] for label in trees}
        cpu_ms: dict[str, list[dict]] = {label: [] for label in trees}
        loads = []
        for r in range(a.rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for label in order:
                root, ext = trees[label]
                out = Path(tmp) / "round.json"
                cmd = [sys.executable, "-m", "loadtest.bench_single_stream", "--rounds", "1", "--tokens",
                       str(a.tokens), "--threads", str(a.threads), "--json", str(out)]
                cmd += ["--only", *a.only] if a.only else []
                env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
                subprocess.run(cmd, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
                result = json.loads(out.read_text())
                rates[label].append(result["tok_s"])
                cpu_ms[label].append(result["cpu_ms_per_token"])
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1} (load {loads[-1]:.1f}): " + "; ".join(
                f"{label}: " + ", ".join(f"{n} {v:.1f} tok/s {cpu_ms[label][-1][n]:.1f} CPU ms"
                                         for n, v in rates[label][-1].items()) for label in trees), flush=True)
    before, after = (rates[label] for label in trees)
    cpu_before, cpu_after = (cpu_ms[label] for label in trees)
    print(f"\n{a.threads} thread(s), {a.tokens} tokens, {a.rounds} alternating rounds, load average "
          f"{min(loads):.1f}-{max(loads):.1f}; CPU ms = the process's CPU time (all threads) per decoded token\n")
    print(f"| precision | {sha} tok/s | this tree tok/s | ratio | {sha} CPU ms/token | this tree CPU ms/token "
          "| ratio |\n|---|---|---|---|---|---|---|")
    for name in before[0]:
        b, n = [r[name] for r in before], [r[name] for r in after]
        cb, cn = [r[name] for r in cpu_before], [r[name] for r in cpu_after]
        ratio = statistics.median(x / y for x, y in zip(n, b))
        cpu_ratio = statistics.median(y / x for x, y in zip(cn, cb))  # > 1: this tree needs less CPU per token
        print(f"| {name} | {statistics.median(b):.1f} | {statistics.median(n):.1f} | {ratio:.2f}x | "
              f"{statistics.median(cb):.1f} | {statistics.median(cn):.1f} | {cpu_ratio:.2f}x |")


if __name__ == "__main__":
    main()
