"""Ray Serve scale-out on one machine: the single server vs ``adapter-server --ray`` with 1 and 2 replicas.

Every system runs as its own process tree on the same model, flags and adapter store
(``--max-batch 16 --max-seq-len 512 --dtype float32``), CPUs split evenly: the single server and the
1-replica deployment use all ``--cpus`` threads, 2 replicas ``--cpus / 2`` each. Measured per system:

* routing overhead: ``--sequential`` requests one at a time (adapter and base alternating), median
  end-to-end latency at max_tokens 1 and at max_tokens 32; the Ray deployments' excess over the single
  server is the per-request and per-token cost of the ingress, the handle call and the streamed messages
  (``GET /health``, answered by the ingress alone, separates the proxy hop from the engine-replica hop);
* throughput: ``--requests`` requests at ``--concurrency``, ``--max-tokens`` tokens each (EOS ignored),
  spread over 4 adapters (LoRA, IA3, prefix, LoRA) and the base: generated tokens per second of wall time.

Usage: ``python -m loadtest.bench_ray [--model tiny-llama-builtin] [--cpus 2] [--out results.json]``.
Prints a markdown table (docs/DEPLOY.md quotes it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.adapters_gen import AdapterFactory, register
from loadtest.servers import LOOPBACK, ServerProcess, free_port

ADAPTERS = [("lora", 0), ("ia3", 0), ("prefix", 0), ("lora", 1)]


def server_argv(model: str, store: Path, port: int, threads: int, ray_replicas: int | None, cpus: int) -> list[str]:
    argv = [sys.executable, "-m", "server.cli", "--model", model, "--adapter-dir", str(store), "--host", LOOPBACK,
            "--port", str(port), "--max-batch", "16", "--max-seq-len", "512", "--max-waiting", "1024",
            "--dtype", "float32", "--max-adapter-slots", "4", "--request-timeout", "0", "--log-level", "warning"]
    if ray_replicas:
        argv += ["--ray", "--replicas", str(ray_replicas), "--replica-cpus", str(threads), "--ray-num-cpus", str(cpus)]
    return argv


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


async def measure(url: str, base: str, names: list[str], args) -> dict:
    targets = names + [base]
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        for i, model in enumerate(targets * 2):  # warm-up: every adapter resident
            await one(client, model, f"warm {i}", 4)
        health = []
        for _ in range(args.sequential):
            start = time.perf_counter()
            (await client.get("/health")).raise_for_status()
            health.append(time.perf_counter() - start)
        out = {"median_ms_health": 1000 * statistics.median(health)}
        for tokens in (1, 32):
            latencies = [(await one(client, targets[i % len(targets)], f"seq {i}", tokens))[0]
                         for i in range(args.sequential)]
            out[f"median_ms_{tokens}"] = 1000 * statistics.median(latencies)
        semaphore = asyncio.Semaphore(args.concurrency)

        async def limited(i: int):
            async with semaphore:
                return await one(client, targets[i % len(targets)], f"load {i}: tell me a story", args.max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(args.requests)))
        wall = time.perf_counter() - start
        out["tokens_per_s"] = sum(t for _, t in results) / wall
        out["wall_s"] = wall
        return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama-builtin")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--sequential", type=int, default=30)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from server.engine.factory import resolve
    from server.config import EngineConfig

    model_dir = Path(resolve(EngineConfig(model=args.model)).model)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    factory = AdapterFactory(model_dir, work / "adapters", rank=8)
    specs = [factory.get(kind, index) for kind, index in ADAPTERS]
    register(work / "store", specs)
    systems = [("single server", None, args.cpus), ("ray, 1 replica", 1, args.cpus),
               ("ray, 2 replicas", 2, max(1, args.cpus // 2))]
    rows = []
    for label, replicas, threads in systems:
        port = free_port()
        argv_ = server_argv(str(model_dir), work / "store", port, threads, replicas, args.cpus)
        with ServerProcess(label, argv_, port, work / f"{label.replace(' ', '_')}.log",
                           env={"OMP_NUM_THREADS": str(threads)}) as server:
            row = asyncio.run(measure(server.url, model_dir.name, [s.name for s in specs], args))
        row.update(system=label, startup_s=server.startup_seconds)
        rows.append(row)
        print(json.dumps(row), flush=True)
    single = rows[0]
    print(f"\n{model_dir.name}, {args.cpus} CPUs; sequential medians over {args.sequential} requests; throughput: "
          f"{args.requests} requests x {args.max_tokens} tokens at concurrency {args.concurrency}\n")
    print("| system | startup s | GET /health ms | 1-token request ms | 32-token request ms | "
          "overhead per request ms | overhead per token ms | tokens/s | vs single |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_request = r["median_ms_1"] - single["median_ms_1"]
        per_token = (r["median_ms_32"] - single["median_ms_32"] - per_request) / 31
        print(f"| {r['system']} | {r['startup_s']:.0f} | {r['median_ms_health']:.1f} | {r['median_ms_1']:.1f} | "
              f"{r['median_ms_32']:.1f} | {per_request:.1f} | {per_token:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / single['tokens_per_s']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
