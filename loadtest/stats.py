"""From timed requests to the numbers a benchmark reports.

* throughput: tokens generated inside the measurement window per second, and requests per second,
  each request counted by the share of its tokens that arrived inside the window (a short
  window of a closed loop, whose requests finish in waves, would otherwise count 0 or 16);
* latency: time to first token (TTFT), inter-token latency (ITL: gaps between streamed
  chunks, every gap of every request), time per output token (TPOT, per request) and
  end-to-end latency, as p50 / p99 (and mean);
* SLO attainment: the share of the measured requests that finished with TTFT <= ``slo_ttft``
  and TPOT <= ``slo_tpot`` (a failed request misses);
* adapter cache hit rate: from the server's Prometheus counters, scraped before and after.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loadtest.driver import RunRecord

CACHE_HITS = "adapter_server_adapter_cache_hits"
CACHE_MISSES = "adapter_server_adapter_cache_misses"


@dataclass(frozen=True)
class SLO:
    ttft: float = 2.0   # seconds
    tpot: float = 0.25  # seconds per output token


def _pcts(values: list[float], prefix: str) -> dict[str, float | None]:
    if not values:
        return {f"{prefix}_p50": None, f"{prefix}_p99": None, f"{prefix}_mean": None}
    a = np.asarray(values, dtype=float)
    return {f"{prefix}_p50": float(np.percentile(a, 50)), f"{prefix}_p99": float(np.percentile(a, 99)),
            f"{prefix}_mean": float(a.mean())}


def summarize(record: RunRecord, slo: SLO) -> dict:
    """The numbers of one run (times in seconds, rates per second)."""
    window = max(record.window_end - record.window_start, 1e-9)
    start, end = record.window_start, record.window_end
    measured = record.results
    ok = [r for r in measured if r.ok]
    every = measured + record.warmup_results  # warm-up requests still finishing count toward window throughput
    tokens = sum(r.tokens_between(start, end) for r in every)
    request_shares = sum(r.share_between(start, end) for r in every)
    completed_in_window = sum(1 for r in every if r.ok and r.done is not None and start <= r.done <= end)
    meets = [r for r in ok if r.ttft is not None and r.ttft <= slo.ttft and (r.tpot is None or r.tpot <= slo.tpot)]
    kinds: dict[str, int] = {}
    for r in measured:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    errors: dict[str, int] = {}
    for r in measured:
        if not r.ok:
            key = (r.error or "unknown")[:120]
            errors[key] = errors.get(key, 0) + 1
    out = {
        "requests_sent": len(measured),
        "requests_ok": len(ok),
        "requests_failed": len(measured) - len(ok),
        "window_s": window,
        "throughput_req_s": request_shares / window,
        "completed_in_window": completed_in_window,
        "throughput_tok_s": tokens / window,
        "completion_tokens_mean": float(np.mean([r.completion_tokens for r in ok])) if ok else None,
        "slo_attainment": len(meets) / len(measured) if measured else None,
        "kinds": kinds,
        "errors": errors,
    }
    out.update(_pcts([r.ttft for r in ok if r.ttft is not None], "ttft"))
    out.update(_pcts([g for r in ok for g in r.gaps], "itl"))
    out.update(_pcts([r.tpot for r in ok if r.tpot is not None], "tpot"))
    out.update(_pcts([r.e2e for r in ok if r.e2e is not None], "e2e"))
    return out


def parse_counters(text: str, names: tuple[str, ...] = (CACHE_HITS, CACHE_MISSES)) -> dict[str, float]:
    """Sum of each counter in a Prometheus exposition (labels summed over)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in totals:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[family.name] += sample.value
    return totals


def cache_hit_rate(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    hits = after[CACHE_HITS] - before[CACHE_HITS]
    misses = after[CACHE_MISSES] - before[CACHE_MISSES]
    return {"adapter_cache_hits": hits, "adapter_cache_misses": misses,
            "adapter_cache_hit_rate": hits / (hits + misses) if hits + misses else None}


def percentiles(values: list[float], prefix: str) -> dict[str, float | None]:
    """``<prefix>_p50``, ``<prefix>_p99`` and ``<prefix>_mean`` of ``values`` (None when there are none)."""
    return _pcts(values, prefix)


def batch_summary(results: list, wall: float) -> dict:
    """One batch of requests started together: generated tokens / wall time, TTFT and ITL percentiles."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    out = {"requests": len(results), "failed": len(results) - len(ok), "tokens": tokens, "wall_s": wall,
           "tok_s": tokens / wall if wall > 0 else None}
    out.update(_pcts([r.ttft for r in ok if r.ttft is not None], "ttft"))
    out.update(_pcts([g for r in ok for g in r.gaps], "itl"))
    return out
