"""Hundreds of adapters at default flags (issue 26): 1,000 LoRAs against 4, same Poisson load, one server.

1. The store: 1,000 LoRA adapters on q, k, v, o of the default model (SmolLM2-135M-Instruct), ranks 8, 16, 32
   and 64 in turn (adapter ``aNNNN`` has rank RANKS[N % 4]). PEFT makes one template per rank
   (loadtest.adapters_gen.make_template); ``--variants`` redrawn copies per rank hold distinct weights, and the
   1,000 adapter directories are hard links to them, indexed directly (copying 1,000 files of 3.7-29 MB through
   ``AdapterStore.add`` takes minutes). Every adapter is a complete PEFT directory with its own name and index
   record, so the server reads each from the store like any other (the page cache holds the ~64 distinct files:
   store reads are memory-speed here, as on a warm production host).
2. The load time of one r=16 q,k,v,o adapter of the default model, in this process: the store read
   (``load_adapter``: safetensors -> validated bf16 tensors) and the copy into a rank-64 slot
   (``write_slot``), each on one thread whose torch ops run inline, as the server's loading threads run them;
   median of ``--load-repeats``.
3. One ``adapter-server`` at its default flags (only ``--adapter-dir`` and ``--port`` are given).
   Base capacity: ``--capacity-requests`` (32: twice the default batch) base requests sent at once, requests/s = count / wall. Then the same
   open-loop Poisson arrivals at ``--load`` (0.8) x that rate, ``--requests`` requests of ``--new-tokens``
   tokens each, for: 4 adapters (one of each rank, uniform), 1,000 with Zipf popularity (alpha 1, adapters in
   a seeded shuffled order) and 1,000 uniform. Per run: throughput (generated tokens / (last finish - first
   arrival)), TTFT p50 and p99, the slot hit rate (admissions that found their adapter in a device slot:
   adapter_cache_hits / (hits + misses)), the CPU-tier hit rate (slot misses that needed no store read:
   1 - loads / misses) and the mean slot wait (adapter_slot_wait_seconds). Targets: throughput >= 0.9x and
   TTFT p99 <= 2x of the 4-adapter run.

The machine is shared (2 cores, other jobs may run): numbers are noisy; ratios within one run are what count.

    python -m loadtest.bench_many_adapters            # make bench-many-adapters
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx

from loadtest.adapters_gen import CONFIG_NAME, WEIGHTS_NAME, make_template, perturb
from loadtest.client import complete, new_client
from loadtest.harness import machine
from loadtest.servers import ServerProcess, free_port
from loadtest.stats import percentiles
from loadtest.workload import RequestSpec, Zipf, poisson_arrivals, prompt_id_pool

log = logging.getLogger("bench_many_adapters")
RANKS = (8, 16, 32, 64)
COUNTERS = ("adapter_server_adapter_cache_hits", "adapter_server_adapter_cache_misses",
            "adapter_server_adapter_loads", "adapter_server_adapter_evictions")
SLOT_WAIT = "adapter_server_adapter_slot_wait_seconds"
TARGETS = {"throughput_ratio_min": 0.9, "ttft_p99_ratio_max": 2.0}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_many_adapters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--variants", type=int, default=16, help="distinct weight files per rank")
    p.add_argument("--requests", type=int, default=120, help="requests per scenario")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--load", type=float, default=0.8, help="arrival rate as a share of the base capacity")
    p.add_argument("--capacity-requests", type=int, default=32, help="base requests sent at once to measure capacity")
    p.add_argument("--capacity-req-s", type=float, default=None, help="use this base capacity (requests/s) instead of "
                   "measuring it: what-if runs (e.g. another --server-arg) at the same offered load as an earlier run; "
                   "the adapter scenarios run near saturation, so a capacity measured 10%% higher overloads them")
    p.add_argument("--load-repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1, help="rounds of the three scenarios, order rotated; ratios are "
                   "medians over rounds of the ratio within a round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("docs/benchmarks/many_adapters.json"))
    p.add_argument("--work", type=Path, default=None, help="adapters, store and server log (default: a temp dir)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="an extra server flag, repeated (e.g. --server-arg=--adapter-slot-bytes=4294967296); the "
                   "issue's run uses none: default flags")
    return p.parse_args(argv)


def adapter_names(n: int) -> list[str]:
    return [f"a{i:04d}" for i in range(n)]


def rank_of(name: str) -> int:
    return RANKS[int(name[1:]) % len(RANKS)]


def build_store(model_dir: Path, work: Path, n: int, variants: int, seed: int) -> Path:
    """The store of ``n`` adapters (see the module docstring); returns its root."""
    from adapters.store import INDEX_NAME, AdapterStore, _record, _sha256

    files = {}
    for r in RANKS:
        template = make_template("lora", model_dir, work / "templates" / f"r{r}", rank=r, seed=seed + r)
        files[r] = [perturb(template, work / "variants" / f"r{r}-{v}", "lora", seed * 7919 + r * 1000 + v)
                    for v in range(variants)]
    records = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    by_variant = {}
    root = work / "store"
    (root / "adapters").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(adapter_names(n)):
        src = files[rank_of(name)][(i // len(RANKS)) % variants]
        dest = root / "adapters" / name
        dest.mkdir(exist_ok=True)
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            if not (dest / f).exists():
                os.link(src / f, dest / f)
        if src not in by_variant:
            by_variant[src] = _record(name, dest, _sha256(dest / WEIGHTS_NAME), stamp)
        records[name] = replace(by_variant[src], name=name).to_dict()
    (root / INDEX_NAME).write_text(json.dumps({"version": 1, "adapters": records}))
    store = AdapterStore(root)
    assert len(store) == n, f"the store holds {len(store)} adapters, not {n}"
    return root


def load_times(model_dir: Path, adapter_dir: Path, dtype: str, repeats: int) -> dict:
    """ms to read one adapter from the store and to copy it into a rank-64 slot (module docstring, 2.)."""
    import torch

    from adapters.format import BaseSpec, load_adapter
    from server.engine import threads as torch_threads
    from server.model.adapter_layers import install_adapter_layers, uninstall_adapter_layers, write_slot
    from server.model.loader import load_model, parse_dtype

    loaded = load_model(model_dir, dtype=parse_dtype(dtype))
    base = BaseSpec.from_hf_config(loaded.hf_config, loaded.name)
    _, layers = install_adapter_layers(loaded.model, 1, 64)

    def once():
        start = time.perf_counter()
        adapter = load_adapter(adapter_dir, base, max_rank=64, name="r16", dtype=loaded.dtype)
        read = time.perf_counter()
        write_slot(layers, 1, adapter)
        return (read - start) * 1e3, (time.perf_counter() - read) * 1e3, adapter.nbytes

    with torch.no_grad(), ThreadPoolExecutor(1, initializer=torch_threads.inline_parallel_ops) as pool:
        pool.submit(once).result()  # warm-up
        runs = [pool.submit(once).result() for _ in range(repeats)]
    uninstall_adapter_layers(loaded.model)
    return {"store_to_cpu_ms": statistics.median(r[0] for r in runs),
            "cpu_to_slot_ms": statistics.median(r[1] for r in runs), "adapter_bytes_in_memory": runs[0][2],
            "file_bytes": (adapter_dir / WEIGHTS_NAME).stat().st_size, "repeats": repeats}


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(COUNTERS + (SLOT_WAIT + "_sum", SLOT_WAIT + "_count"), 0.0)
    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name in COUNTERS and s.name.endswith("_total"):
                out[family.name] += s.value
            elif s.name in out:
                out[s.name] += s.value
            elif s.name == "adapter_server_adapters_resident":
                out[f"resident_{s.labels['tier']}"] = s.value
    return out


async def open_loop(url: str, base_model: str, specs: list[RequestSpec], arrivals: list[float]):
    client = new_client(url)
    try:
        start = time.perf_counter()

        async def one(i: int, spec: RequestSpec, at: float):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            return await complete(client, i, spec, base_model)

        results = await asyncio.gather(*(one(i, s, a) for i, (s, a) in enumerate(zip(specs, arrivals))))
        return list(results), start
    finally:
        await client.aclose()


async def closed_batch(url: str, base_model: str, specs: list[RequestSpec]):
    client = new_client(url)
    try:
        start = time.perf_counter()
        results = await asyncio.gather(*(complete(client, i, s, base_model) for i, s in enumerate(specs)))
        return list(results), time.perf_counter() - start
    finally:
        await client.aclose()


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process's threads, by OS thread name without its ``_N`` suffix: "engine"
    (the step loop and the OpenMP workers it started), "adapter-load", "adapter-slot", and the rest under their
    own names (the HTTP event loop is the process's name). Empty where /proc is missing."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1:stat.rindex(")")].rsplit("_", 1)[0]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def run_scenario(srv: ServerProcess, name: str, specs: list[RequestSpec], arrivals: list[float]) -> dict:
    before, cpu_before = scrape(srv.url), thread_cpu(srv.proc.pid)
    results, start = asyncio.run(open_loop(srv.url, srv.base_model, specs, arrivals))
    after, cpu_after = scrape(srv.url), thread_cpu(srv.proc.pid)
    ok = [r for r in results if r.ok]
    end = max((r.done for r in ok), default=start)
    tokens = sum(r.completion_tokens for r in ok)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if not k.startswith("resident_")}
    hits, misses, loads = d[COUNTERS[0]], d[COUNTERS[1]], d[COUNTERS[2]]
    out = {"requests": len(results), "ok": len(ok), "distinct_adapters": len({s.adapter for s in specs}),
           "tok_s": tokens / (end - start) if end > start else 0.0,
           **percentiles([r.ttft for r in ok if r.ttft is not None], "ttft"),
           "slot_hit_rate": hits / (hits + misses) if hits + misses else None,
           "cpu_hit_rate": max(0.0, 1 - loads / misses) if misses else None,
           "slot_hits": hits, "slot_misses": misses, "store_loads": loads, "evictions": d[COUNTERS[3]],
           "slot_wait_mean_s": (d[SLOT_WAIT + "_sum"] / d[SLOT_WAIT + "_count"]) if d[SLOT_WAIT + "_count"] else None,
           "resident_device": after.get("resident_device"), "resident_cpu": after.get("resident_cpu")}
    # where the server's CPU went, as shares of the scenario's wall time on every core (the profile that says what
    # adapter loads cost the step loop: on 2 cores a loading thread takes its time from the engine's)
    cores = os.cpu_count() or 1
    out["server_cpu_share"] = {k: round((v - cpu_before.get(k, 0.0)) / ((end - start) * cores), 4)
                               for k, v in sorted(cpu_after.items()) if v - cpu_before.get(k, 0.0) > 0} \
        if end > start else {}
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        out["errors"] = errors[:3]
    print(f"{name}: {out['tok_s']:.1f} tok/s, TTFT p50 {out['ttft_p50']:.3f} s p99 {out['ttft_p99']:.3f} s, "
          f"slot hits {out['slot_hit_rate']}, CPU hits {out['cpu_hit_rate']}, {len(ok)}/{len(results)} ok; server CPU "
          f"(share of {os.cpu_count()} cores): {json.dumps(out['server_cpu_share'])}", flush=True)
    return out


def table(load: dict, capacity: dict, rows: dict[str, dict], reference: str) -> str:
    ref = rows[reference]
    lines = [f"store -> CPU {load['store_to_cpu_ms']:.1f} ms, CPU -> slot {load['cpu_to_slot_ms']:.1f} ms "
             f"(r=16 q,k,v,o; median of {load['repeats']})",
             f"base capacity {capacity['req_s']:.2f} req/s ({capacity['tok_s']:.0f} tok/s); offered "
             f"{capacity['offered_req_s']:.2f} req/s",
             "| scenario | adapters used | tok/s | vs 4 | TTFT p50 | TTFT p99 | p99 vs 4 | slot hits | CPU hits | "
             "slot wait mean |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {name} | {r['distinct_adapters']} | {r['tok_s']:.1f} | {r['tok_s'] / ref['tok_s']:.2f} | "
                     f"{r['ttft_p50']:.3f} s | {r['ttft_p99']:.3f} s | {r['ttft_p99'] / ref['ttft_p99']:.2f} | "
                     f"{f(r['slot_hit_rate'], '.2f')} | {f(r['cpu_hit_rate'], '.2f')} | "
                     f"{f(r['slot_wait_mean_s'], '.3f')} s |")
    return "\n".join(lines)


def run(args, work: Path) -> dict:
    from server.config import EngineConfig
    from server.engine.factory import resolve
    from server.model.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    model_dir = ensure_default_model()
    dtype = resolve(EngineConfig(model=str(model_dir))).dtype
    started = time.perf_counter()
    store = build_store(model_dir, work, args.adapters, args.variants, args.seed)
    print(f"store of {args.adapters} adapters built in {time.perf_counter() - started:.0f} s", flush=True)
    load = load_times(model_dir, store / "adapters" / adapter_names(2)[1], dtype, args.load_repeats)
    print(f"load: {json.dumps(load)}", flush=True)

    defaults = EngineConfig()
    pool = prompt_id_pool(model_dir)
    rng = random.Random(args.seed)

    def prompt():
        return [rng.choice(pool) for _ in range(args.prompt_tokens)]

    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "--adapter-dir", str(store), "--port", str(port), *args.server_arg]
    with ServerProcess("adapter-server", argv, port, work / "server.log", base_model=DEFAULT_MODEL_NAME) as srv:
        print("server:", " ".join(argv), flush=True)
        asyncio.run(closed_batch(srv.url, srv.base_model, [RequestSpec(None, prompt(), 8)
                                                            for _ in range(defaults.max_batch)]))  # warm-up
        n = args.capacity_requests
        results, wall = asyncio.run(closed_batch(srv.url, srv.base_model,
                                                 [RequestSpec(None, prompt(), args.new_tokens) for _ in range(n)]))
        capacity = {"requests": n, "wall_s": wall, "req_s": n / wall,
                    "tok_s": sum(r.completion_tokens for r in results) / wall}
        if args.capacity_req_s is not None:  # measured above all the same (it warms the server); reported beside
            capacity.update(measured_req_s=capacity["req_s"], req_s=args.capacity_req_s,
                            tok_s=args.capacity_req_s * args.new_tokens)
        capacity["offered_req_s"] = args.load * capacity["req_s"]
        print(f"capacity: {json.dumps(capacity)}", flush=True)
        arrivals = poisson_arrivals(capacity["offered_req_s"], args.requests, seed=args.seed)
        prompts = [prompt() for _ in range(args.requests)]
        names = adapter_names(args.adapters)
        shuffled = names[:]
        random.Random(args.seed + 1).shuffle(shuffled)
        zipf, pick = Zipf(len(shuffled), 1.0), random.Random(args.seed + 2)
        four = names[:4]  # ranks 8, 16, 32, 64
        draws = {  # each round draws its own adapter sequence (a repeat would find round 1's adapters cached)
            "4 adapters, uniform": lambda: four[pick.randrange(4)],
            f"{args.adapters}, Zipf 1": lambda: shuffled[zipf.sample(pick)],
            f"{args.adapters}, uniform": lambda: names[pick.randrange(len(names))],
        }
        rounds = []
        order = list(draws)
        for r in range(args.rounds):  # rotated order: the machine drifts; ratios are taken within a round
            popularity = {name: [draw() for _ in range(args.requests)] for name, draw in draws.items()}
            names_r = order[r % len(order):] + order[:r % len(order)]
            rounds.append({name: run_scenario(srv, f"round {r + 1} {name}",
                                              [RequestSpec(a, p, args.new_tokens)
                                               for a, p in zip(popularity[name], prompts)], arrivals)
                           for name in names_r})
    reference = order[0]
    ratios = {name: {"throughput": statistics.median(rd[name]["tok_s"] / rd[reference]["tok_s"] for rd in rounds),
                     "ttft_p99": statistics.median(rd[name]["ttft_p99"] / rd[reference]["ttft_p99"] for rd in rounds)}
              for name in order}
    met = {name: ratio["throughput"] >= TARGETS["throughput_ratio_min"]
           and ratio["ttft_p99"] <= TARGETS["ttft_p99_ratio_max"] for name, ratio in ratios.items()}
    for r, rd in enumerate(rounds):
        print(f"round {r + 1}")
        print(table(load, capacity, {name: rd[name] for name in order}, reference))
    print("median ratios to the 4-adapter run:", json.dumps(ratios))
    print("targets met:", json.dumps(met))
    return {"server_argv": argv, "dtype": dtype, "load_ms": load, "capacity": capacity, "rounds": rounds,
            "ratios_vs_4": ratios, "targets": TARGETS, "targets_met": met}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, args.work or Path(tmp))
    result = {"command": "python -m loadtest.bench_many_adapters " + " ".join(sys.argv[1:] if argv is None else argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
              "wall_s": round(time.time() - started, 1), "machine": machine(),
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"json: {args.json}")
    return result


if __name__ == "__main__":
    main()
