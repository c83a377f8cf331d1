"""Prefix caching, measured through HTTP: multi-turn chats on many adapters, caching on vs off in one run.

Workload (issue 22, point 7): `--clients` concurrent chat clients over `--adapters` LoRA adapters (r=16 on
q,k,v,o, made with PEFT on the served model), client i on adapter i % adapters; each adapter has its own
system prompt of about `--system-tokens` tokens; each client holds a `--turns`-turn conversation in
which every turn resends the whole history (system, earlier questions and the assistant's earlier
answers) and streams `--new-tokens` tokens (greedy, `ignore_eos`). All clients start together.

The same workload runs against two servers started one after the other with the same flags (the
defaults, plus `--max-batch` = clients and `--max-adapter-slots` = adapters), one of them with
`--no-prefix-caching`. Reported per server: TTFT p50 / p99 over every turn of every client, generated
tokens per second of wall time (the whole workload), prompt tokens and the cached prompt tokens the
server reported (usage.prompt_tokens_details.cached_tokens), and its prefix-cache / preemption metrics;
then the ratios off / on.

    python -m loadtest.bench_prefix                    # make bench-prefix
    python -m loadtest.bench_prefix --clients 8 --turns 2 --system-tokens 300   # a quicker look
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.adapters_gen import AdapterFactory, register
from loadtest.harness import machine
from loadtest.servers import default_server

log = logging.getLogger(__name__)

WORDS = ("river", "stone", "market", "lantern", "orbit", "garden", "ledger", "violet", "engine", "harbor",
         "quiet", "signal", "copper", "meadow", "thread", "canvas", "winter", "pilot", "anchor", "mosaic")
QUESTIONS = ("Summarise the rules above in one sentence.", "What is the second rule about?",
             "Give an example that follows the rules.", "Which rule matters most, and why?",
             "Rephrase the first rule.", "What would break the third rule?")


def system_prompt(adapter: int, tokens: int) -> str:
    """About `tokens` tokens of numbered rules, different for every adapter (seeded)."""
    rng = random.Random(adapter)
    lines, n = [f"You are assistant number {adapter}. Follow these rules."], 0
    while n < tokens:
        words = " ".join(rng.choice(WORDS) for _ in range(12))
        lines.append(f"Rule {len(lines)}: {words}.")
        n += 17  # ~1 token a word, plus the number and punctuation (SmolLM2's tokenizer)
    return "\n".join(lines)


async def conversation(client: httpx.AsyncClient, url: str, adapter: str, system: str, turns: int,
                       new_tokens: int, seed: int) -> list[dict]:
    """One client's turns: [{ttft, tokens, prompt_tokens, cached_tokens}]."""
    messages = [{"role": "system", "content": system}]
    out = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[(seed + turn) % len(QUESTIONS)]})
        body = {"model": adapter, "messages": messages, "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        start, ttft, text, usage = time.perf_counter(), None, [], None
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {}).get("content")
                    if delta:
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        text.append(delta)
        messages.append({"role": "assistant", "content": "".join(text)})
        out.append({"ttft": ttft, "tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)})
    return out


async def workload(url: str, adapters: list[str], systems: list[str], args) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(
            conversation(client, url, adapters[i % len(adapters)], systems[i % len(adapters)], args.turns,
                         args.new_tokens, i) for i in range(args.clients)))
        wall = time.perf_counter() - start
    return [turn for turns in results for turn in turns], wall


def metrics(url: str) -> dict[str, float]:
    names = ("prefix_cache_queried_tokens_total", "prefix_cache_hit_tokens_total", "preemptions_total",
             "kv_cache_blocks_total")
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for name in names:
            if line.startswith(f"adapter_server_{name} "):
                values[name] = float(line.split()[-1])
    return values


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(turns: list[dict], wall: float) -> dict:
    ttfts = [t["ttft"] for t in turns if t["ttft"] is not None]
    tokens = sum(t["tokens"] for t in turns)
    return {"turns": len(turns), "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": percentile(ttfts, 0.99),
            "generated_tok_per_s": tokens / wall, "wall_s": wall, "generated_tokens": tokens,
            "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
            "cached_tokens": sum(t["cached_tokens"] for t in turns)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the server's default model)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=600)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.model is None:
        from server.model.default_model import ensure_default_model

        model = ensure_default_model()
    else:
        model = Path(args.model).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    factory = AdapterFactory(model, work / "adapters", rank=16, seed=1)
    specs = [factory.get("lora", i) for i in range(args.adapters)]
    store = work / "store"
    register(store, specs)
    names = [s.name for s in specs]
    systems = [system_prompt(i, args.system_tokens) for i in range(args.adapters)]
    flags = ["--max-batch", str(args.clients), "--max-adapter-slots", str(args.adapters), "--log-level", "warning",
             "--request-timeout", "0"]
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "flags": flags}
    for name, extra in (("caching on", []), ("caching off", ["--no-prefix-caching"])):
        with default_server(model, store, work / "logs" / f"{name.replace(' ', '-')}.log", flags + extra) as srv:
            # warm up: every adapter into its slot, on a prompt that shares nothing with the workload
            for adapter in names:
                httpx.post(f"{srv.url}/v1/chat/completions", timeout=600, json={
                    "model": adapter, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1})
            before = metrics(srv.url)
            turns, wall = asyncio.run(workload(srv.url, names, systems, args))
            after = metrics(srv.url)
            summary = summarize(turns, wall)
            summary["metrics"] = {k: after.get(k, 0) - before.get(k, 0) for k in after if k != "kv_cache_blocks_total"}
            summary["kv_cache_blocks_total"] = after.get("kv_cache_blocks_total")
            summary["argv"] = srv.argv
            results[name] = summary
        print(f"{name}: TTFT p50 {summary['ttft_p50_s']:.2f} s, p99 {summary['ttft_p99_s']:.2f} s, "
              f"{summary['generated_tok_per_s']:.1f} generated tok/s over {summary['wall_s']:.1f} s, "
              f"{summary['cached_tokens']} of {summary['prompt_tokens']} prompt tokens cached, "
              f"metrics {summary['metrics']}", flush=True)
    on, off = results["caching on"], results["caching off"]
    results["ratios"] = {"ttft_p50_off_over_on": off["ttft_p50_s"] / on["ttft_p50_s"],
                         "ttft_p99_off_over_on": off["ttft_p99_s"] / on["ttft_p99_s"],
                         "throughput_on_over_off": on["generated_tok_per_s"] / off["generated_tok_per_s"]}
    print(f"caching on vs off: TTFT p50 {results['ratios']['ttft_p50_off_over_on']:.2f}x lower, "
          f"p99 {results['ratios']['ttft_p99_off_over_on']:.2f}x lower, "
          f"throughput {results['ratios']['throughput_on_over_off']:.2f}x (targets: 5x, 2x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
