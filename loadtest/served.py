"""The parts of :mod:`loadtest.bench_served` that are not orchestration: one batch of OpenAI clients,
the server's merge state from ``/metrics``, the long-prompt trial, medians of within-round ratios,
the targets and the table.
"""
from __future__ import annotations

import asyncio
import statistics
import time

import httpx

from loadtest.client import Result, adapter_fields, complete_openai, openai_client
from loadtest.stats import percentiles
from loadtest.workload import RequestSpec
from server.metrics import PREFIX

MERGE_EVENTS = f"{PREFIX}_merge_events"
MERGED_ADAPTERS = f"{PREFIX}_merged_adapters"

# (numerator, denominator, at least): ratios of median-of-round tok/s the issue sets as targets
TARGETS = (("served/base", "hf/base", 1.3), ("served/lora", "served/base", 0.9), ("served/lora", "peft/lora", 4.0),
           ("served/ia3", "served/base", 0.95), ("served/prefix", "served/base", 0.95),
           ("served/merged", "served/base", 0.98), ("served/base", "engine/base", 0.9))
LONG_PROMPT_TARGET = 2.0  # ITL p99 of the running streams while a long prompt joins, at most this x without it


async def run_batch(url: str, base_model: str, specs: list[RequestSpec],
                    fields=adapter_fields) -> tuple[list[Result], float]:
    """All ``specs`` started together, each its own streamed OpenAI client request; (results, wall seconds).
    ``fields``: how the server is told a request's adapter (``client.complete_openai``)."""
    client = openai_client(url)
    try:
        start = time.perf_counter()
        results = await asyncio.gather(*(complete_openai(client, i, s, base_model, fields=fields)
                                         for i, s in enumerate(specs)))
        return list(results), time.perf_counter() - start
    finally:
        await client.close()


def merge_state(text: str) -> dict[str, float]:
    """From a Prometheus exposition: ``merges`` and ``unmerges`` so far, ``merged`` adapters now."""
    from prometheus_client.parser import text_string_to_metric_families

    state = {"merges": 0.0, "unmerges": 0.0, "merged": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == MERGE_EVENTS and sample.name.endswith("_total"):
                state[{"merge": "merges", "unmerge": "unmerges"}[sample.labels["action"]]] += sample.value
            elif family.name == MERGED_ADAPTERS and sample.name == MERGED_ADAPTERS:
                state["merged"] += sample.value
    return state


def scrape_merge_state(url: str) -> dict[str, float]:
    response = httpx.get(url + "/metrics", timeout=30)
    response.raise_for_status()
    return merge_state(response.text)


def gaps_in_window(results: list[Result], start: float, end: float) -> list[float]:
    """Inter-token gaps of ``results`` that overlap [start, end] (a stall across the window counts)."""
    return [b - a for r in results for a, b in zip(r.chunk_times, r.chunk_times[1:]) if b > start and a < end]


async def long_prompt_trial(url: str, base_model: str, streams: list[RequestSpec], long: RequestSpec | None,
                            join_after: int) -> dict:
    """``streams`` started together; with ``long``, once each has ``join_after`` tokens, one long prompt joins.
    The ITL p99 reported is over the streams' gaps during the long prompt's prefill (its send to its first
    token), or over all their gaps without it."""
    client = openai_client(url)
    try:
        live = [Result(index=i, adapter=s.adapter, kind=s.kind, sent=0.0) for i, s in enumerate(streams)]
        tasks = [asyncio.ensure_future(complete_openai(client, i, s, base_model, result=r))
                 for i, (s, r) in enumerate(zip(streams, live))]
        out: dict = {}
        if long is not None:
            while not all(t.done() for t in tasks) and min(len(r.chunk_times) for r in live) < join_after:
                await asyncio.sleep(0.01)
            out["streams_running_at_join"] = sum(not t.done() for t in tasks)
            long_result = await complete_openai(client, len(streams), long, base_model)
            end = long_result.chunk_times[0] if long_result.chunk_times else long_result.done
            out.update(long_ok=long_result.ok, long_error=long_result.error, long_ttft=end - long_result.sent,
                       window=(long_result.sent, end))
        results = await asyncio.gather(*tasks)
    finally:
        await client.close()
    window = out.pop("window", None)
    gaps = gaps_in_window(results, *window) if window else [g for r in results for g in r.gaps]
    out.update(failed=sum(not r.ok for r in results), gaps=len(gaps), **percentiles(gaps, "itl"))
    return out


def median_ratio(rounds: list[dict], num: str, den: str) -> float | None:
    """Median over rounds of tok/s(num) / tok/s(den) within the round (None if either is missing)."""
    values = [r[num]["tok_s"] / r[den]["tok_s"] for r in rounds
              if r.get(num, {}).get("tok_s") and r.get(den, {}).get("tok_s")]
    return statistics.median(values) if values else None


def summarize_rounds(rounds: list[dict], names: list[str], reference: str = "served/base") -> list[dict]:
    """Per system/variant: medians over rounds of tok/s and latencies, ratio to ``reference`` (within-round)."""
    rows = []
    for name in names:
        per = [r[name] for r in rounds if name in r]
        row = {"name": name, "rounds": len(per), "vs_" + reference: median_ratio(rounds, name, reference)}
        for key in ("tok_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99"):
            values = [p[key] for p in per if p.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row["failed"] = sum(p.get("failed", 0) for p in per)
        if any("merged_throughout" in p for p in per):
            row["merged_throughout"] = all(p.get("merged_throughout") for p in per)
        rows.append(row)
    return rows


def check_targets(rounds: list[dict]) -> list[dict]:
    out = []
    for num, den, least in TARGETS:
        value = median_ratio(rounds, num, den)
        out.append({"ratio": f"{num} / {den}", "target": least, "value": value,
                    "met": None if value is None else value >= least})
    return out


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def table(rows: list[dict], targets: list[dict], reference: str = "served/base") -> str:
    lines = [f"| system/variant | tok/s | / {reference} | TTFT p50 s | TTFT p99 s | ITL p50 s | ITL p99 s | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        merged = {True: " (merged)", False: " (NOT merged throughout)"}.get(r.get("merged_throughout"), "")
        lines.append(f"| {r['name']}{merged} | {_f(r['tok_s'], 4)} | {_f(r['vs_' + reference])} | "
                     f"{_f(r['ttft_p50'])} | {_f(r['ttft_p99'])} | {_f(r['itl_p50'])} | {_f(r['itl_p99'])} | "
                     f"{r['failed']} |")
    lines += ["", "| target (median of within-round ratios) | value | at least | met |", "|---|---:|---:|---|"]
    for t in targets:
        met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
        lines.append(f"| {t['ratio']} | {_f(t['value'])} | {t['target']} | {met} |")
    return "\n".join(lines)


def long_summary(rounds: list[dict]) -> dict:
    """Rounds of {"alone": trial, "joined": trial} -> medians of ITL p99 and of the within-round ratio."""
    def med(values):
        values = [v for v in values if v]
        return statistics.median(values) if values else None

    return {"itl_p99_alone": med(x["alone"]["itl_p99"] for x in rounds),
            "itl_p99_joined": med(x["joined"]["itl_p99"] for x in rounds),
            "ratio": med(x["joined"]["itl_p99"] / x["alone"]["itl_p99"] for x in rounds
                         if x["joined"]["itl_p99"] and x["alone"]["itl_p99"]),
            "long_ttft": med(x["joined"]["long_ttft"] for x in rounds), "rounds": rounds}


def long_table(configs: dict[str, dict]) -> str:
    lines = ["| server | ITL p99 alone s | ITL p99 while the long prompt prefills s | ratio | at most | met "
             "| long prompt TTFT s |", "|---|---:|---:|---:|---:|---|---:|"]
    for name, c in configs.items():
        met = "-" if c["ratio"] is None else ("yes" if c["ratio"] <= LONG_PROMPT_TARGET else "NO")
        lines.append(f"| {name} | {_f(c['itl_p99_alone'])} | {_f(c['itl_p99_joined'])} | {_f(c['ratio'])} | "
                     f"{LONG_PROMPT_TARGET} | {met} | {_f(c['long_ttft'])} |")
    return "\n".join(lines)
