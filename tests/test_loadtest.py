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
