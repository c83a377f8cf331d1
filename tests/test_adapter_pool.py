"""Adapter tiers in the engine: more adapters than slots, prefetch while queued, merge-on-demand,
load failures and replaced adapters."""
import asyncio
import time
from collections import Counter

import pytest
import torch

from adapters.store import AdapterNotFound, AdapterStore
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams, Status
from server.model.loader import load_model
from tests.peft_adapters import make_dora, make_ia3, make_lora, make_prefix, perturbed_copies


class RecordingMetrics:
    """Stands in for server.metrics.Metrics: records what the pool reports."""

    def __init__(self):
        self.counts = Counter()
        self.gauges = {}
        test = self

        class Metric:
            def __init__(self, name):
                self.name = name

            def inc(self, amount=1):
                test.counts[self.name] += amount

            def set(self, value):
                test.gauges[self.name] = value

            def observe(self, value):
                test.counts[self.name + "_observations"] += 1

            def labels(self, **labels):
                return Metric(self.name + ":" + ",".join(f"{k}={v}" for k, v in labels.items()))

        self._metric = Metric

    def observe_kv_cache(self, queried, hits, preemptions, used, total):  # the engine's per-step KV report
        self.gauges["kv_blocks_used"] = used

    def __getattr__(self, name):
        return self._metric(name)


@pytest.fixture(scope="module")
def base(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def store(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    store = AdapterStore(root / "store")
    lora = make_lora(base, root / "lora", seed=11)
    for i, path in enumerate(perturbed_copies(lora, root / "copies", 14, seed=1)):
        store.add(f"lora-{i}", path)
    ia3 = make_ia3(base, root / "ia3", seed=12)
    for i, path in enumerate(perturbed_copies(ia3, root / "copies", 3, seed=2)):
        store.add(f"ia3-{i}", path)
    prefix = make_prefix(base, root / "prefix", seed=13)
    for i, path in enumerate(perturbed_copies(prefix, root / "copies", 3, seed=3)):
        store.add(f"prefix-{i}", path)
    store.add("hot", lora)
    store.add("hot-ia3", ia3)
    store.add("hot-dora", make_dora(base, root / "dora", seed=14))  # DoRA folds exactly: merged like LoRA
    return store


@pytest.fixture(scope="module")
def loaded(base):
    return load_model(base, dtype=torch.float32)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_twenty_adapters_through_three_slots_sixty_concurrent_requests(loaded, store):
    engine = Engine(loaded, EngineConfig(max_batch=6, max_seq_len=64, max_adapter_slots=3, merge_threshold=2.0),
                    store=store)
    engine.metrics = metrics = RecordingMetrics()
    names = [r.name for r in store.list() if not r.name.startswith("hot")]
    assert len(names) == 20
    engine.start()
    try:
        async def run_all():
            async def one(i):
                request = engine.make_request([5 + i % 7, 72, 101, 108], greedy(4), adapter=names[i % 20])
                return request, [o async for o in engine.stream(request)]
            return await asyncio.gather(*(one(i) for i in range(60)))
        results = asyncio.run(run_all())
    finally:
        engine.shutdown()
    assert all(outs[-1].finish_reason == "length" and len(req.output_token_ids) == 4 for req, outs in results)
    assert engine.adapters.table.in_use <= 3
    assert metrics.counts["adapter_evictions"] >= 17  # 20 adapters through 3 slots
    assert metrics.counts["adapter_loads"] == 20      # each loaded from disk once (the CPU cache holds them all)
    # the same adapter and prompt give the same tokens however the requests were interleaved
    by_key = {}
    for request, _ in results:
        by_key.setdefault((request.adapter, tuple(request.prompt_token_ids)), set()).add(
            tuple(request.output_token_ids))
    assert all(len(v) == 1 for v in by_key.values())
    # and different adapters give different outputs for one prompt
    assert len({next(iter(v)) for (name, p), v in by_key.items() if p[0] == 5}) > 1


def test_adapter_loads_while_request_waits(loaded, store):
    engine = Engine(loaded, EngineConfig(max_batch=1, max_seq_len=64, max_adapter_slots=2), store=store)
    busy = engine.make_request([1, 2, 3], greedy(30))
    waiting = engine.make_request([1, 2, 3], greedy(2), adapter="lora-3")
    engine.submit(busy, lambda o: None)
    engine.submit(waiting, lambda o: None)
    engine._drain_inbox()
    deadline = time.monotonic() + 10
    while waiting.adapter_version not in engine.adapters.cpu:
        engine.step()
        assert time.monotonic() < deadline
    assert waiting.status is Status.WAITING and busy.status is Status.RUNNING
    while engine.scheduler.has_work():
        engine.step()
    assert len(waiting.output_token_ids) == 2


def test_unknown_adapter_is_refused(loaded, store):
    engine = Engine(loaded, EngineConfig(max_batch=1, max_seq_len=64), store=store)
    with pytest.raises(AdapterNotFound, match="nope"):
        engine.make_request([1, 2], greedy(1), adapter="nope")


def run_mix(loaded, store, merge: bool, hot: str = "hot"):
    config = EngineConfig(max_batch=8, max_seq_len=64, max_adapter_slots=4,
                          merge_threshold=0.6 if merge else 2.0, unmerge_threshold=0.3, merge_patience=1,
                          merge_min_batch=2)
    engine = Engine(loaded, config, store=store)
    engine.metrics = metrics = RecordingMetrics()
    names = [hot] * 5 + ["lora-1", "ia3-0", None]
    lengths = [6] * 5 + [20, 20, 20]  # the hot rows finish first: the adapter cools and is unmerged
    requests = [engine.make_request([5 + i, 72, 101, 108, 108], greedy(n), adapter=name)
                for i, (name, n) in enumerate(zip(names, lengths))]
    engine.generate(requests)
    return [r.output_token_ids for r in requests], metrics


@pytest.mark.parametrize("hot", ["hot", "hot-ia3", "hot-dora"])
def test_merged_and_unmerged_outputs_are_identical(loaded, store, hot):
    """A hot LoRA, IA3 or DoRA adapter merged and unmerged mid-run: every row (hot, other LoRA, other IA3, base)
    generates what it generates with no merge at all."""
    unmerged, quiet = run_mix(loaded, store, merge=False, hot=hot)
    merged, metrics = run_mix(loaded, store, merge=True, hot=hot)
    assert quiet.counts["merge_events:action=merge"] == 0
    assert metrics.counts["merge_events:action=merge"] == 1
    assert metrics.counts["merge_events:action=unmerge"] == 1
    assert merged == unmerged


@pytest.mark.parametrize("hot", ["hot", "hot-ia3", "hot-dora"])
def test_merge_over_nf4_base_keeps_outputs(base, store, hot):
    loaded = load_model(base, dtype=torch.float32, quantization="nf4")
    unmerged, _ = run_mix(loaded, store, merge=False, hot=hot)
    merged, metrics = run_mix(loaded, store, merge=True, hot=hot)
    assert metrics.counts["merge_events:action=merge"] == 1
    assert merged == unmerged
    # unmerged again: the quantized modules are back
    layer = next(iter(loaded.model.adapter_install[1].values()))
    assert layer.merged is None and type(layer.base).__name__ == "Linear4bit"


def test_broken_adapter_fails_its_request_only(loaded, store, tmp_path):
    own = AdapterStore(tmp_path / "store")
    for record in store.list()[:2]:
        own.add(record.name, store.path(record.name))
    broken = own.list()[0].name
    (own.path(broken) / "adapter_model.safetensors").write_bytes(b"garbage")
    engine = Engine(loaded, EngineConfig(max_batch=2, max_seq_len=64), store=own)
    bad = engine.make_request([1, 2], greedy(3), adapter=broken)
    good = engine.make_request([1, 2], greedy(3), adapter=own.list()[1].name)
    outputs = engine.generate([bad, good])
    assert outputs[bad.request_id][-1].finish_reason == "error"
    assert "could not be loaded" in outputs[bad.request_id][-1].error
    assert len(good.output_token_ids) == 3


def test_replaced_adapter_serves_new_weights(loaded, base, tmp_path):
    own = AdapterStore(tmp_path / "store")
    first = make_lora(base, tmp_path / "v1", seed=21)
    second = make_lora(base, tmp_path / "v2", seed=22)
    own.add("x", first)
    engine = Engine(loaded, EngineConfig(max_batch=2, max_seq_len=64), store=own)

    def tokens():
        request = engine.make_request([5, 6, 7], greedy(8), adapter="x")
        engine.generate([request])
        return request.output_token_ids

    before = tokens()
    own.add("x", second, overwrite=True)
    engine.invalidate_adapter("x")
    after = tokens()
    reference = Engine(loaded, EngineConfig(max_batch=2, max_seq_len=64), store=own)
    fresh = reference.make_request([5, 6, 7], greedy(8), adapter="x")
    reference.generate([fresh])
    assert after == fresh.output_token_ids != before


def test_a_new_engine_does_not_inherit_a_merge(loaded, store):
    def base_tokens():
        engine = Engine(loaded, EngineConfig(max_batch=4, max_seq_len=64), store=store)
        request = engine.make_request([5, 6, 7], greedy(6))
        engine.generate([request])
        return request.output_token_ids

    before = base_tokens()
    hot = Engine(loaded, EngineConfig(max_batch=4, max_seq_len=64, merge_threshold=0.5, unmerge_threshold=0.01,
                                      merge_patience=1, merge_min_batch=1), store=store)
    hot.generate([hot.make_request([5, 6, 7], greedy(6), adapter="hot") for _ in range(4)])
    assert hot.adapters.merged_slot  # still merged when this engine goes away
    assert base_tokens() == before


@pytest.mark.parametrize("chunk, min_interleaved", [(5, 1), (16, 0)])
def test_chunked_prefill_equals_unchunked_for_every_kind(loaded, store, chunk, min_interleaved):
    """Long prompts split into chunks of `chunk` tokens (a 40-token prompt over 3+ chunks) that interleave
    with decoding rows of base, LoRA, IA3 and prefix requests: every greedy output equals the unchunked one."""
    jobs = [(None, list(range(30, 70)), 6), ("lora-1", [5, 72, 101, 108], 10), ("ia3-0", list(range(3, 40)), 7),
            ("prefix-1", [9] * 19, 8), ("lora-2", list(range(100, 141)), 5), (None, [40, 41, 42], 9)]

    def run(max_prefill_tokens):
        engine = Engine(loaded, EngineConfig(max_batch=4, max_seq_len=96, max_adapter_slots=4, merge_threshold=2.0,
                                             max_prefill_tokens=max_prefill_tokens), store=store)
        requests = [engine.make_request(p, greedy(n), adapter=a) for a, p, n in jobs]
        for request in requests:
            engine.submit(request, lambda o: None)
        engine._drain_inbox()
        plans, schedule = [], engine.scheduler.schedule
        engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
        while engine.scheduler.has_work():
            engine.step()
        cut = sum(any(not c.last for g in p.prefill for c in g) for p in plans)
        # steps where a half-prefilled prompt shared the step with decoding rows (over the paged cache a decode
        # batch holds only decoding rows: no placeholders)
        interleaved = sum(p.decode is not None and any(not c.last for g in p.prefill for c in g) for p in plans)
        assert all(all(p.decode.sampled) for p in plans if p.decode is not None)
        return [r.output_token_ids for r in requests], cut, interleaved

    expected, cut, _ = run(4096)
    outputs, chunked, interleaved = run(chunk)
    assert cut == 0 and chunked >= 3      # prompts really were left half-prefilled between steps
    assert interleaved >= min_interleaved  # a prompt's chunks interleaved with decoding rows
    assert outputs == expected
    assert all(len(o) == n for o, (_, _, n) in zip(outputs, jobs))
