"""The served benchmark: `adapter-server` with its default flags, measured through HTTP with OpenAI clients.

The server runs as a subprocess with every flag at its default except `--max-batch 32
--max-adapter-slots 32` and `--model DIR`, plus `--adapter-dir` (a fresh store holding the
benchmark's adapters) and `--port` (a free one); the exact argv is printed and written to
the JSON. It picks its dtype itself (`--dtype auto`); the peers use the dtype
`server.engine.factory.resolve` gives for the same config, and `--threads` torch threads
(the server and the engine-only run use torch's default); in-process runs happen in a thread of their
own, as the server's engine does (`bench_engine.like_the_server`).

`--clients` concurrent AsyncOpenAI streams, `--new-tokens` each (`ignore_eos`), started
together; tok/s = generated tokens / wall time of that batch. Variants: base; every client a
distinct LoRA (r=16 on q,k,v,o); a distinct IA3; a distinct prefix (16 virtual tokens); a
mix (base, LoRA, IA3, prefix in turn); all clients on one hot LoRA, which the server's
default merge policy merges (warmed up until /metrics says so); a distinct DoRA (r=16, q,k,v,o);
a distinct LoRA with ``lora_bias``; a distinct prompt-tuning adapter (16 virtual tokens); a distinct
composition (the client's LoRA + its IA3 in one request); a distinct AdapterHub Houlsby bottleneck adapter
(double_seq_bn, reduction 16: width 48 on the bench model, after attention and after the MLP; random weights,
loadtest.bench_bottleneck's writer). `--variants` picks some of them. Each variant is warmed up
(its adapters loaded into slots, the merge state it needs reached) before it is timed.
In the same rounds: the engine in-process (`Engine.generate`, the server's resolved config),
HF `generate` on the base and PEFT's mixed-batch `generate(adapter_names=...)` on the same
LoRAs. Rounds rotate the order (served variants first, then the in-process peers, then a pause:
SETTLE_S); every ratio is the median over rounds of the ratio within one round (this machine drifts
10-30% between runs minutes apart).

`--with-vllm`: rows vllm/base and vllm/lora, the same batches on `adapter-server --engine vllm` (same
flags and store; docs/VLLM.md), timed in the same rounds.

`--with-llamacpp`: instead of the variants above, ours against llama.cpp's llama-server at the same weight
precision (F16 / bf16, Q8_0 / int8-wo, Q4_1 / the GGUF grid), on the default model, in alternating rounds:
one stream, 32 streams base, 32 distinct LoRAs, TTFT of long prompts (loadtest.served_llamacpp; make
install-llamacpp first).

`--long-prompt`: ITL p99 of `--streams` running streams while one `--long-tokens` prompt
joins, against the same streams alone, on a server with `--max-prefill-tokens --chunk`
(chunked prefill) and one with `--max-prefill-tokens --no-chunk`.

    python -m loadtest.bench_served                    # make bench-served
    python -m loadtest.bench_served --long-prompt      # make bench-served ARGS=--long-prompt
    python -m loadtest.bench_served --with-llamacpp    # make bench-served ARGS=--with-llamacpp
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from loadtest import served, served_llamacpp
from loadtest.adapters_gen import AdapterFactory, AdapterSpec, register
from loadtest.bench_bottleneck import write_bottleneck
from loadtest.bench_adapters import PeftPeer
from loadtest.bench_engine import HFGenerate, like_the_server
from loadtest.harness import machine, resolve_model
from loadtest.servers import default_server
from loadtest.stats import batch_summary
from loadtest.workload import RequestSpec, Workload, prompt_id_pool
from server.config import EngineConfig
from server.engine.factory import build_engine, resolve
from server.engine.request import SamplingParams
from server.model.loader import parse_dtype

log = logging.getLogger("bench_served")
VARIANTS = ("base", "lora", "ia3", "prefix", "mix", "merged", "dora", "lorabias", "prompt", "compose", "houlsby")
SINGLE_KINDS = ("lora", "ia3", "prefix", "dora", "lorabias", "prompt")  # a distinct adapter per client
IN_PROCESS = ("engine/base", "hf/base", "peft/lora")
# Seconds between a round's in-process peers and the next round's served batches. With the peers rotated among
# the served variants, the served batch right after PEFT's generate ran ~12% slow (2026-12-01: served/base 330
# tok/s first in round 1, 288-289 right after peft/lora in rounds 2 and 3), which skewed every ratio to the base.
# So each round runs the served variants (rotated), then the peers (rotated), then pauses.
SETTLE_S = 5.0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_served", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'bench' (the ~134M Llama of bench_engine; the default), 'builtin' "
                   "or a dir; --with-llamacpp runs the default model (SmolLM2-135M-Instruct) only")
    p.add_argument("--clients", type=int, default=32, help="concurrent OpenAI clients (= distinct adapters)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (medians; default 3, 2 with "
                   "--with-llamacpp)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    p.add_argument("--slots", type=int, default=32, help="the server's --max-adapter-slots")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the HF and PEFT peers")
    p.add_argument("--skip-peers", action="store_true", help="leave out HF, PEFT and the engine-only run")
    p.add_argument("--variants", type=lambda v: v.split(","), default=list(VARIANTS),
                   help="comma-separated subset of the served variants (default all: " + ",".join(VARIANTS) + ")")
    p.add_argument("--with-vllm", action="store_true", help="peer rows vllm/base and vllm/lora: the same load on "
                   "`adapter-server --engine vllm` with the same flags (make install-vllm; docs/VLLM.md)")
    p.add_argument("--long-prompt", action="store_true", help="the chunked-prefill benchmark instead")
    p.add_argument("--with-llamacpp", action="store_true", help="ours against llama-server at the same weight "
                   "precision instead (loadtest.served_llamacpp; make install-llamacpp)")
    p.add_argument("--llamacpp-precisions", type=lambda v: v.split(","), default=list(served_llamacpp.GROUPS),
                   help="comma-separated subset of " + ",".join(served_llamacpp.GROUPS))
    p.add_argument("--llamacpp-int4-wo", action="store_true", help="also ours with --quantization int4-wo against Q4_1")
    p.add_argument("--ttft-prompts", type=lambda v: [int(x) for x in v.split(",")], default=[2000, 7000],
                   help="prompt lengths whose TTFT --with-llamacpp measures")
    p.add_argument("--ttft-rounds", type=int, default=1, help="--with-llamacpp: the rounds that measure TTFT")
    p.add_argument("--llamacpp-loads", type=lambda v: v.split(","), default=list(served_llamacpp.LOAD_FAMILIES),
                   help="--with-llamacpp: comma-separated subset of " + ",".join(served_llamacpp.LOAD_FAMILIES))
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--stream-tokens", type=int, default=128)
    p.add_argument("--long-tokens", type=int, default=900, help="prompt tokens of the prompt that joins")
    p.add_argument("--join-after", type=int, default=8, help="tokens every stream has before it joins")
    p.add_argument("--chunk", type=int, default=64, help="--max-prefill-tokens of the chunked server")
    p.add_argument("--no-chunk", type=int, default=4096, help="--max-prefill-tokens of the unchunked server")
    p.add_argument("--json", type=Path, default=None,
                   help="default: docs/benchmarks/served.json (served-long-prompt.json with --long-prompt)")
    p.add_argument("--work", type=Path, default=None, help="adapters, store and server logs (default: a temp dir)")
    args = p.parse_args(argv)
    if args.with_llamacpp and args.long_prompt:
        p.error("--with-llamacpp and --long-prompt are separate benchmarks: give one")
    if args.with_llamacpp:
        unknown = set(args.llamacpp_precisions) - set(served_llamacpp.GROUPS)
        if unknown:
            p.error(f"--llamacpp-precisions: unknown {sorted(unknown)}; choose from {list(served_llamacpp.GROUPS)}")
        unknown = set(args.llamacpp_loads) - set(served_llamacpp.LOAD_FAMILIES)
        if unknown:
            p.error(f"--llamacpp-loads: unknown {sorted(unknown)}; choose from {list(served_llamacpp.LOAD_FAMILIES)}")
        if args.model not in (None, "default"):
            p.error("--with-llamacpp runs the default model (llama-server serves its GGUF file): leave out --model")
        from server.model.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    args.model = args.model or "bench"
    args.rounds = args.rounds or (2 if args.with_llamacpp else 3)
    default = ("served-long-prompt.json" if args.long_prompt else
               "served-llamacpp.json" if args.with_llamacpp else "served.json")
    args.json = args.json or Path("docs/benchmarks") / default
    return args


class Setup:
    """Model, adapters in a fresh store, prompts, and the server's resolved config."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.model = resolve_model(args.model)
        self.store = work / "store"
        self.config = resolve(EngineConfig(model=str(self.model), max_batch=args.max_batch,
                                           max_adapter_slots=args.slots, adapter_dir=str(self.store)))
        self.dtype = self.config.dtype
        self.pool = prompt_id_pool(self.model)
        self.flags = ["--max-batch", str(args.max_batch), "--max-adapter-slots", str(args.slots)]

    def prompts(self, n: int, tokens: int, seed: int = 0) -> list[list[int]]:
        return [s.prompt for s in Workload([], prompt_ids=self.pool, prompt_tokens=tokens, seed=seed).take(n)]

    def adapters(self, n: int) -> dict[str, list]:
        factory = AdapterFactory(self.model, self.work / "adapters", rank=16, prefix_tokens=16, seed=1)
        counts = {kind: n for kind in SINGLE_KINDS} | {"lora": n + 1}  # one more LoRA: the hot (merged) adapter
        specs = {kind: [factory.get(kind, i) for i in range(count)] for kind, count in counts.items()}
        # AdapterHub houlsby (double_seq_bn, reduction 16: width 48 on the bench model), random weights
        specs["houlsby"] = [AdapterSpec(f"houlsby-{i:04d}", "houlsby", write_bottleneck(
            self.work / "adapters" / f"houlsby-{i:04d}", self.model, "houlsby", i)) for i in range(n)]
        register(self.store, [s for kind in specs.values() for s in kind])
        return specs

    def server(self, name: str, extra: list[str] | None = None):
        return default_server(self.model, self.store, self.work / "logs" / f"{name}.log", self.flags + (extra or []))


def variants(specs: dict[str, list], prompts: list[list[int]], new_tokens: int) -> dict[str, list[RequestSpec]]:
    n = len(prompts)
    hot = specs["lora"][n].name  # an adapter of its own: never one of the distinct LoRAs
    kinds = [None, "lora", "ia3", "prefix"]
    names = {"base": [None] * n, "merged": [hot] * n,
             "mix": [None if kinds[i % 4] is None else specs[kinds[i % 4]][i].name for i in range(n)],
             **{kind: [specs[kind][i].name for i in range(n)] for kind in (*SINGLE_KINDS, "houlsby")}}
    out = {f"served/{v}": [RequestSpec(a, p, new_tokens) for a, p in zip(names[v], prompts)]
           for v in VARIANTS if v in names}
    # a composition per client (adapters.composition): its own LoRA and IA3 in one slot
    out["served/compose"] = [RequestSpec(None, p, new_tokens, adapters={specs["lora"][i].name: 1.0,
                                                                        specs["ia3"][i].name: 1.0})
                             for i, p in enumerate(prompts)]
    return out


def warm(srv, specs: list[RequestSpec], want_merged: bool, tries: int = 4) -> dict:
    """Untimed batches of the variant until its adapters sit in slots and the merge state is the one wanted."""
    state = served.scrape_merge_state(srv.url)
    long_enough = EngineConfig().merge_patience + 8  # steps the default merge policy needs to change its mind
    for _ in range(tries):
        tokens = long_enough if (state["merged"] > 0) != want_merged else 4
        asyncio.run(served.run_batch(srv.url, srv.base_model, [replace(s, max_tokens=tokens) for s in specs]))
        state = served.scrape_merge_state(srv.url)
        if (state["merged"] > 0) == want_merged:
            break
    return state


def timed_served(srv, specs: list[RequestSpec], merged: bool) -> dict:
    before = warm(srv, specs, want_merged=merged)
    results, wall = asyncio.run(served.run_batch(srv.url, srv.base_model, specs))
    after = served.scrape_merge_state(srv.url)
    out = batch_summary(results, wall)
    if merged:
        out["merged_throughout"] = bool(before["merged"] and after["merged"] and after["unmerges"] == before["unmerges"])
    errors = {r.error for r in results if not r.ok}
    if errors:
        log.warning("failed requests: %s", sorted(errors)[:3])
    return out


def in_process_peers(setup: Setup, specs: dict[str, list], prompts: list[list[int]], args) -> tuple[dict, int]:
    """(name -> a function timing one batch in this process at its thread count, torch's default threads)."""
    default_threads, dtype, n = torch.get_num_threads(), parse_dtype(setup.dtype), len(prompts)
    torch.set_num_threads(args.threads)
    hf = HFGenerate(setup.model, dtype, prompts, args.new_tokens)
    peft = PeftPeer(setup.model, [s.path for s in specs["lora"][:n]], dtype, n, args.new_tokens, ids=prompts)
    torch.set_num_threads(default_threads)
    engine = build_engine(setup.config)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def engine_seconds(tokens: int = args.new_tokens) -> float:
        requests = [engine.make_request(p, replace(params, max_tokens=tokens)) for p in prompts]
        start = time.perf_counter()
        engine.generate(requests)
        return time.perf_counter() - start

    engine_seconds(4)  # warm-up

    def at(threads: int, seconds):
        def run() -> dict:
            torch.set_num_threads(threads)
            try:
                wall = seconds()
            finally:
                torch.set_num_threads(default_threads)
            return {"wall_s": wall, "tok_s": n * args.new_tokens / wall}
        return run

    return {"engine/base": at(default_threads, engine_seconds), "hf/base": at(args.threads, hf.seconds),
            "peft/lora": at(args.threads, peft.seconds)}, default_threads


def run_main(args, setup: Setup) -> dict:
    prompts = setup.prompts(args.clients, args.prompt_tokens)
    specs = setup.adapters(args.clients)
    work = {k: v for k, v in variants(specs, prompts, args.new_tokens).items()
            if k.removeprefix("served/") in args.variants}
    peers, threads = ({}, torch.get_num_threads()) if args.skip_peers else in_process_peers(setup, specs, prompts, args)
    if args.with_vllm:  # the variants vLLM serves, on the same prompts and LoRAs
        work.update({"vllm/base": work["served/base"], "vllm/lora": work["served/lora"]})
    names = list(work) + list(peers)
    rounds = []
    served_names, peer_names = list(work), list(peers)
    with setup.server("served") as srv, contextlib.ExitStack() as stack:
        print("server:", " ".join(srv.argv), flush=True)
        vllm = stack.enter_context(setup.server("vllm", ["--engine", "vllm"])) if args.with_vllm else None
        if vllm is not None:
            print("vLLM server:", " ".join(vllm.argv), f"(up after {vllm.startup_seconds:.0f} s)", flush=True)
        for r in range(args.rounds):
            row = {}
            for name in _rotated(served_names, r) + _rotated(peer_names, r):
                if name in peers:
                    row[name] = peers[name]()
                else:
                    row[name] = timed_served(vllm if name.startswith("vllm/") else srv, work[name],
                                             name == "served/merged")
                print(f"round {r + 1} {name}: {row[name]['tok_s']:.1f} tok/s", flush=True)
            rounds.append(row)
            if peer_names:
                time.sleep(SETTLE_S)
    summary = served.summarize_rounds(rounds, names)
    targets = served.check_targets(rounds)
    print(served.table(summary, targets))
    return {"server_argv": srv.argv, "in_process_threads": {"engine/base": threads, "hf/base": args.threads,
                                                             "peft/lora": args.threads},
            "vllm_server_argv": vllm.argv if vllm else None, "rounds": rounds, "summary": summary, "targets": targets}


def _rotated(names: list[str], r: int) -> list[str]:
    return names[r % len(names):] + names[:r % len(names)] if names else []


def run_long(args, setup: Setup) -> dict:
    streams = [RequestSpec(None, p, args.stream_tokens) for p in setup.prompts(args.streams, args.prompt_tokens)]
    long = RequestSpec(None, setup.prompts(1, args.long_tokens, seed=1)[0], 4)
    configs, argvs = {}, {}
    for name, chunk in (("chunked", args.chunk), ("unchunked", args.no_chunk)):
        with setup.server(name, ["--max-prefill-tokens", str(chunk)]) as srv:
            print("server:", " ".join(srv.argv), flush=True)
            argvs[name] = srv.argv
            trial = lambda joined: asyncio.run(served.long_prompt_trial(  # noqa: E731
                srv.url, srv.base_model, streams, long if joined else None, args.join_after))
            trial(True)  # warm-up
            rounds = []
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                rounds.append({("joined" if j else "alone"): trial(j) for j in order})
                print(f"{name} round {r + 1}: " + json.dumps({k: v["itl_p99"] for k, v in rounds[-1].items()}))
        configs[f"{name} (--max-prefill-tokens {chunk})"] = served.long_summary(rounds)
    print(served.long_table(configs))
    return {"server_argv": argvs, "configs": configs}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        setup = Setup(args, work)
        print(f"model {setup.model}; server dtype (resolved) {setup.dtype}; flags besides --model, --adapter-dir "
              f"and --port: {' '.join(setup.flags)}; peers: {args.threads} torch threads; server and engine-only: "
              f"torch's default ({torch.get_num_threads()} here)", flush=True)
        # everything in-process (peers, engine-only, clients) runs like the server's engine (see like_the_server)
        mode = run_long if args.long_prompt else served_llamacpp.run if args.with_llamacpp else run_main
        result = like_the_server(mode, args, setup)
    result = {"command": "python -m loadtest.bench_served " + " ".join(sys.argv[1:] if argv is None else argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
              "wall_s": round(time.time() - started, 1), "machine": machine(), "dtype": setup.dtype,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "engine_config": asdict(setup.config), **result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"json: {args.json}")
    return result


if __name__ == "__main__":
    main()
