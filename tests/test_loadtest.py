"""Smoke tests of the load tools on the tiny built-in model: real locust, real HTTP, real processes.

* the workload draws what it promises (Zipf popularity, kind mix, reproducible);
* the locustfile runs headless for ~5 s against a live server and exits by itself, with TTFT
  recorded as a metric of its own and no failed request;
* the harness runs end to end with a tiny configuration (our server and the PEFT peer as
  subprocesses) and writes JSON and PNG plots; the PEFT peer's greedy text for the same
  adapter equals ours.
"""
from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loadtest.workload import Workload, Zipf, assign_kinds, parse_mix, ranked_adapters, ranked_from_available

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "locustfile.py"


def test_zipf_and_mix():
    zipf = Zipf(8, 1.0)
    assert zipf.probabilities[0] == pytest.approx(1 / sum(1 / (i + 1) for i in range(8)))
    rng = random.Random(0)
    counts = Counter(zipf.sample(rng) for _ in range(20000))
    assert counts[0] / 20000 == pytest.approx(zipf.probabilities[0], abs=0.02)
    assert counts[0] > counts[1] > counts[7]
    uniform = Counter(Zipf(4, 0.0).sample(rng) for _ in range(8000))
    assert all(abs(uniform[i] / 8000 - 0.25) < 0.03 for i in range(4))

    mix = parse_mix("lora=0.5,ia3=0.25,prefix=0.25")
    kinds = Counter(assign_kinds(32, mix))
    assert kinds == {"lora": 16, "ia3": 8, "prefix": 8}
    assert ranked_adapters(4, mix) == ["lora-0000", "ia3-0000", "prefix-0000", "lora-0001"]
    assert ranked_from_available({"lora": ["b", "a"], "ia3": ["x"]}, None, mix) == ["a", "x", "b"]
    with pytest.raises(ValueError):
        parse_mix("lora=1,dora=1")


def test_workload_is_reproducible():
    def make() -> Workload:
        return Workload(ranked_adapters(8, {"lora": 1.0}), skew=1.0, base_fraction=0.2, seed=3, prompt_tokens=5,
                        prompt_ids=[10, 11, 12])

    a, b = make().take(200), make().take(200)
    assert a == b
    assert all(len(s.prompt) == 5 for s in a)
    assert 20 < sum(s.adapter is None for s in a) < 60  # ~20% base requests
    assert Counter(s.adapter for s in a if s.adapter).most_common(1)[0][0] == "lora-0000"


@pytest.fixture(scope="module")
def store(builtin_model_dir, tmp_path_factory):
    """One adapter of each kind, generated like the harness does, in an adapter store."""
    from loadtest.adapters_gen import AdapterFactory, register

    root = tmp_path_factory.mktemp("loadtest")
    factory = AdapterFactory(builtin_model_dir, root / "adapters", rank=8, prefix_tokens=4)
    register(root / "store", factory.many(["lora-0000", "ia3-0000", "prefix-0000", "lora-0001"]))
    return root / "store"


@pytest.fixture(scope="module")
def live(builtin_model_dir, store):
    from server.api.app import create_app
    from server.config import EngineConfig
    from server.engine.factory import build_engine
    from tests.server_harness import LiveServer

    engine = build_engine(EngineConfig(model=str(builtin_model_dir), max_batch=4, max_seq_len=256,
                                       adapter_dir=str(store), max_adapter_slots=4, max_lora_rank=8))
    with LiveServer(create_app(engine)) as server:
        yield server


def test_locustfile_headless(live, tmp_path):
    locust = Path(sys.executable).parent / "locust"
    prefix = tmp_path / "run"
    proc = subprocess.run([str(locust), "-f", str(LOCUSTFILE), "--headless", "-H", live.url, "-u", "4", "-r", "4",
                           "-t", "5s", "--stop-timeout", "30", "--only-summary", "--csv", str(prefix),
                           "--max-tokens", "4", "--prompt-words", "4", "--stream-fraction", "0.75",
                           "--base-fraction", "0.2", "--mix", "lora=1,ia3=1,prefix=1"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] != "Aggregated"]
    by_type = Counter()
    for row in rows:
        by_type[row["Type"]] += int(row["Request Count"])
        assert int(row["Failure Count"]) == 0, row
    # the users' first four draws (seeded) stream two requests and not the other two
    streamed = sum(int(r["Request Count"]) for r in rows if r["Type"] == "POST" and "stream]" in r["Name"])
    assert streamed >= 2 and by_type["POST"] > streamed and by_type["TTFT"] > 0, rows
    kinds = {row["Name"].split("[")[1].split()[0].rstrip("]") for row in rows if row["Type"] == "POST"}
    assert kinds & {"lora", "ia3", "prefix"}, kinds


def test_harness_end_to_end(builtin_model_dir, tmp_path):
    from loadtest import harness

    out = tmp_path / "bench"
    result = harness.main(["--model", str(builtin_model_dir), "--counts", "2", "--workloads", "mixed,base",
                           "--peers", "peft", "--requests", "6", "--warmup", "0.5", "--max-tokens", "4",
                           "--prompt-tokens", "8", "--concurrency", "3", "--max-batch", "4", "--slots", "4",
                           "--rank", "8", "--prefix-tokens", "4", "--drain-timeout", "60", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    labels = {r["label"]: r for r in saved["rows"]}
    assert set(labels) == {"ours/mixed", "ours/lora", "ours/base", "peft/lora"}
    for row in labels.values():
        assert "error" not in row, row
        assert row["requests_ok"] == 6 and row["throughput_tok_s"] > 0 and row["ttft_p50"] > 0, row
        assert row["completion_tokens_mean"] == 4
    assert labels["ours/mixed"]["adapter_cache_hit_rate"] is not None
    assert {(e["system"], e["against"]) for e in saved["ratios"]} >= {("peft/lora", "ours/lora"),
                                                                       ("ours/lora", "ours/base")}
    assert saved["checks"]["peft"] == saved["checks"]["ours"]  # same adapter file, same greedy text
    for png in ("throughput_vs_adapters.png", "latency_vs_adapters.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "work").exists()  # generated adapters removed


def test_served_ratios_targets_and_tables():
    """bench_served's pure parts: medians of within-round ratios, targets, the tables, /metrics merge state."""
    from loadtest import served
    from server.metrics import Metrics

    def rnd(scale: float) -> dict:  # one round: tok/s per system/variant, everything drifting together
        tok = {"served/base": 100, "served/lora": 95, "served/ia3": 90, "served/prefix": 99, "served/mix": 97,
               "served/merged": 100, "engine/base": 105, "hf/base": 70, "peft/lora": 20}
        return {k: {"tok_s": v * scale, "ttft_p50": 0.1, "itl_p99": 0.2, "failed": 0} for k, v in tok.items()}

    rounds = [rnd(1.0), rnd(0.7), rnd(1.3)]
    for r in rounds:
        r["served/merged"]["merged_throughout"] = True
    assert served.median_ratio(rounds, "served/lora", "served/base") == pytest.approx(0.95)
    assert served.median_ratio(rounds, "served/lora", "missing") is None
    rows = served.summarize_rounds(rounds, list(rounds[0]))
    assert rows[0]["tok_s"] == 100 and rows[0]["vs_served/base"] == pytest.approx(1.0)
    assert next(r for r in rows if r["name"] == "served/merged")["merged_throughout"] is True
    rounds[1]["served/merged"]["merged_throughout"] = False  # one round not merged: the row says so
    assert not next(r for r in served.summarize_rounds(rounds, ["served/merged"]))["merged_throughout"]
    met = {t["ratio"]: t["met"] for t in served.check_targets(rounds)}
    assert met["served/base / hf/base"] is True and met["served/ia3 / served/base"] is False
    assert met["served/lora / peft/lora"] is True and met["served/base / engine/base"] is True
    text = served.table(rows, served.check_targets(rounds))
    assert "| served/merged (merged) | 100 |" in text and "| served/ia3 / served/base | 0.9 | 0.95 | NO |" in text
    long = served.long_table({"chunked": {"itl_p99_alone": 0.1, "itl_p99_joined": 0.15, "ratio": 1.5,
                                          "long_ttft": 2.0}})
    assert "| chunked | 0.1 | 0.15 | 1.5 | 2.0 | yes | 2 |" in long
    trials = [{"alone": {"itl_p99": a}, "joined": {"itl_p99": j, "long_ttft": 1.0}} for a, j in ((0.1, 0.3), (0.2, 0.2))]
    assert served.long_summary(trials)["ratio"] == pytest.approx(2.0) and served.long_summary(trials)["long_ttft"] == 1

    metrics = Metrics()
    metrics.merge_events.labels(action="merge").inc(2)
    metrics.merge_events.labels(action="unmerge").inc()
    metrics.merged_adapters.set(1)
    assert served.merge_state(metrics.render()[0].decode()) == {"merges": 2.0, "unmerges": 1.0, "merged": 1.0}


def test_gaps_in_window():
    from loadtest.client import Result
    from loadtest.served import gaps_in_window

    r = Result(index=0, adapter=None, kind="base", sent=0.0, chunk_times=[1.0, 1.1, 2.5, 2.6, 4.0])
    assert gaps_in_window([r], 1.5, 2.55) == pytest.approx([1.4, 0.1])  # the stall across the window counts
    assert gaps_in_window([r], 5.0, 6.0) == []


def test_tenants_turnovers_and_targets():
    """bench_tenants' pure parts: A's tokens in the window (a cancelled request's chunks count), the turnover
    (window / A's completions in it), B's extra TTFT p50 in turnovers, the targets and the table."""
    from loadtest.bench_tenants import summarize, table, targets_met
    from loadtest.client import Result

    def req(sent, chunks, tokens, ok=True, error=None):
        return Result(index=0, adapter=None, kind="base", sent=sent, done=chunks[-1] if ok else None, ok=ok,
                      status=200, error=error, chunk_times=chunks, completion_tokens=tokens)

    # window [10, 20]: A finishes 4 requests inside it (turnover 2.5 s), one before, one cut off at the end
    a = [req(0.0, [9.0, 9.5], 2)] + [req(5.0, [t - 1.0, t], 2) for t in (12.0, 14.0, 16.0, 18.0)]
    a.append(req(15.0, [19.0, 19.5, 20.5], 0, ok=False))  # cancelled: no usage, each chunk one token
    b = [req(10.0, [10.5 + 3.0 * i] * 2, 2) for i in range(3)]  # TTFTs 0.5, 3.5, 6.5 (sent at 10.0)
    solo = [req(0.0, [0.25, 0.3], 2), req(0.0, [0.5, 0.6], 2), req(0.0, [0.75, 0.8], 2)]
    out = summarize(a, b, solo, 10.0, 20.0)
    assert out["a_completions_in_window"] == 4 and out["turnover_s"] == pytest.approx(2.5)
    assert out["a_tok_s"] == pytest.approx((8 + 2) / 10.0)  # 4 finished x 2 tokens + 2 chunks of the cut one
    assert out["total_tok_s"] == pytest.approx((10 + 6) / 10.0)
    assert out["b_solo_ttft_s"] == pytest.approx(0.5) and out["b_ttft_p50"] == pytest.approx(3.5)
    assert out["b_extra_ttft_p50_s"] == pytest.approx(3.0)
    assert out["b_extra_ttft_p50_turnovers"] == pytest.approx(1.2)
    assert out["a_failed"] == 0 and "errors" not in out  # cancelled at the end is not a failure

    failed = req(11.0, [11.5], 0, ok=False, error="HTTP 429: queue full")
    assert summarize(a + [failed], b, solo, 10.0, 20.0)["a_failed"] == 1
    empty = summarize([], [], [], 10.0, 20.0)
    assert empty["turnover_s"] is None and empty["b_extra_ttft_p50_turnovers"] is None

    fair = {**out, "load_average_start": (9.0, 8.0, 7.0), "load_average_end": (9.5, 8.0, 7.0)}
    fifo = {**fair, "a_tok_s": 1.04, "b_extra_ttft_p50_turnovers": 40.0}
    assert targets_met({"fair": fair, "fifo": fifo}) == {"b_extra_ttft_p50_turnovers": True,
                                                       "a_throughput_vs_fifo": True}
    slow = {**fair, "a_tok_s": 0.9, "b_extra_ttft_p50_turnovers": 2.5}
    assert targets_met({"fair": slow, "fifo": fifo}) == {"b_extra_ttft_p50_turnovers": False,
                                                       "a_throughput_vs_fifo": False}
    assert targets_met({"fair": {**fair, "b_extra_ttft_p50_turnovers": None}}) == {
        "b_extra_ttft_p50_turnovers": False}
    text = table({"fair": fair, "fifo": fifo, "none": {**fair, **empty}})
    assert "| fair | 3/3 | 0.500 s | 3.500 s |" in text and "| 1.2 | 1.0 | 0.96 |" in text
    assert "| none | 0/0 | - | - | - | - | - |" in text


def test_kv_write_micro_benchmark():
    """The KV write micro-benchmark of bench-engine (ours vs the old scatter_, checked equal), tiny sizes."""
    import torch

    from loadtest.bench_engine import bench_kv_write

    row = bench_kv_write(torch.float32, seq_len=16, new_tokens=4, batch=2, min_seconds=0.0)
    assert row["T"] == 4 and row["S"] == 16 and row["index_copy_ms"] > 0 and row["scatter_ms"] > 0
    assert bench_kv_write(torch.bfloat16, seq_len=8, new_tokens=128, batch=2, min_seconds=0.0)["T"] == 8


def test_openai_batch_and_merge_state_on_a_live_server(live):
    """The OpenAI-client batch bench_served times, with an adapter in extra_body and ignore_eos."""
    import asyncio

    from loadtest import served
    from loadtest.stats import batch_summary
    from loadtest.workload import RequestSpec

    import httpx

    model = httpx.get(live.url + "/health").json()["model"]
    specs = [RequestSpec(None, [5, 6, 7, 8], 6), RequestSpec("lora-0000", [5, 6, 7, 8], 6)]
    results, wall = asyncio.run(served.run_batch(live.url, model, specs))
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.completion_tokens for r in results] == [6, 6]
    summary = batch_summary(results, wall)
    assert summary["tokens"] == 12 and summary["failed"] == 0 and summary["tok_s"] > 0
    assert served.scrape_merge_state(live.url)["merged"] == 0
    bad, _ = asyncio.run(served.run_batch(live.url, model, [RequestSpec("no-such-adapter", [5], 2)]))
    assert not bad[0].ok and bad[0].status == 404


def test_served_llamacpp_fields_loads_targets_and_table():
    """bench_served --with-llamacpp's pure parts: llama-server's per-request LoRA field, the workloads, the point-6
    targets from within-round ratios, ours' LoRA/base ratio, the table."""
    from types import SimpleNamespace

    from loadtest import served_llamacpp as sl
    from loadtest.client import adapter_fields
    from loadtest.workload import RequestSpec

    fields = sl.llama_fields({"lora-0000": 0, "lora-0001": 1})
    assert fields(RequestSpec("lora-0001", [1, 2], 4)) == {"lora": [{"id": 1, "scale": 1.0}]}
    assert fields(RequestSpec(None, [1, 2], 4)) == {}
    with pytest.raises(KeyError):
        fields(RequestSpec("lora-0099", [1], 4))
    with pytest.raises(ValueError):
        fields(RequestSpec(None, [1], 4, adapters={"lora-0000": 1.0}))
    assert adapter_fields(RequestSpec("lora-0001", [1], 4)) == {"adapter": "lora-0001"}

    args = SimpleNamespace(stream_tokens=128, prompt_tokens=16, clients=32, new_tokens=64, ttft_prompts=[2000, 7000])
    loads = sl.loads(args)
    assert [(x.key, x.streams, x.new_tokens, x.prompt_tokens, x.lora, x.ttft) for x in loads] == [
        ("single", 1, 128, 16, False, False), ("base", 32, 64, 16, False, False), ("lora", 32, 64, 16, True, False),
        ("ttft-2000", 1, 1, 2000, False, True), ("ttft-7000", 1, 1, 7000, False, True)]

    # (ours, llama) tok/s per load; two rounds with the machine 30% slower in the second, TTFT in round 1 only
    values = {"single": (9, 10), "base": (300, 240), "lora": (260, 80), "ttft-2000": (400, 300), "ttft-7000": (100, 125)}
    rounds = [{f"{who} | {key}": {"tok_s": v[i] * scale, "failed": 0}
               for key, v in values.items() if r == 0 or not key.startswith("ttft")
               for i, who in enumerate(("ours bf16", "llama.cpp F16"))} for r, scale in enumerate((1.0, 0.7))]
    rows = {row["load"]: row for row in sl.summarize(rounds, ["ours bf16"], "llama.cpp F16", loads)}
    expect = {"single": (0.9, False), "base": (1.25, True), "lora": (3.25, True), "ttft-2000": (400 / 300, True),
              "ttft-7000": (0.8, False), "lora/base": (260 / 300, False)}
    assert {k: (pytest.approx(r["ratio"]), r["met"]) for k, r in rows.items()} == expect
    assert rows["single"]["ours_tok_s"] == pytest.approx(9 * 0.85) and rows["ttft-7000"]["llama_tok_s"] == 125
    text = sl.table({"F16": {"summary": list(rows.values())}})
    assert "| F16 | 32 streams, 64 tokens, base | ours bf16 | 255 | 204 | 1.25 | >= 1.2 | yes |" in text
    assert "| F16 | 32 LoRAs / own base | ours bf16 | | | 0.867 | >= 0.9 | NO |" in text


def test_gemm_bench_paths_give_outputs_from_distinct_copies():
    """bench-gemm: every path multiplies (shape [M, N]), and --cold's copies are separate memory (else the 'cold'
    weights would sit in the cache like --hot's)."""
    import torch

    from loadtest.bench_gemm import PATHS, weights
    from server.model import cpu_ext

    kernel = cpu_ext.kernel()
    if kernel is None:
        pytest.skip("the CPU kernels are not built here")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64).bfloat16()
    for path in PATHS:
        make, nbytes, fn = weights(path, 40, 64, kernel, gen)
        a, b = make(), make()
        assert fn(x, a).shape == (3, 40) and nbytes > 0, path
        first = (lambda w: w[0] if isinstance(w, tuple) else w)
        if path != "bf16-packed":  # oneDNN's opaque tensors have no data_ptr; each is packed anew
            assert first(a).data_ptr() != first(b).data_ptr(), path
