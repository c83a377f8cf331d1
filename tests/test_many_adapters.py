"""Hundreds of adapters at default flags (issue 26): slot sizing, loads off the step loop, rank 64 by default,
the tier metrics, and a store of 1,000 adapters."""
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from adapters.store import AdapterStore
from server.config import EngineConfig
from server.engine.engine import IDLE_RECHECK_S, Engine, adapter_slot_plan
from server.engine.request import SamplingParams, Status
from server.engine.slot_sizing import DEFAULT_SLOT_BYTES, SlotPlan, bytes_per_slot, plan_slots, slots_without_model
from server.metrics import Metrics
from server.model.adapter_layers import linear_shapes
from server.model.loader import load_model
from tests.peft_adapters import make_lora, perturbed_copies

MB = 10**6
# SmolLM2-135M (the default model): 30 layers of q, k, v, o, gate, up, down as (in, out); hidden 576, 3 KV heads
# of 64, MLP 1536
SMOLLM2_LINEARS = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * 30


@pytest.mark.parametrize("per_slot, budget, max_batch, max_waiting, requested, expected", [
    (40 * MB, 1 << 30, 16, 256, 0, SlotPlan(26, 40 * MB, "budget")),
    (40 * MB, 100 * MB, 16, 256, 0, SlotPlan(16, 40 * MB, "batch floor")),      # a full batch never waits
    (40 * MB, 0, 4, 256, 0, SlotPlan(4, 40 * MB, "batch floor")),
    (1000, 1 << 30, 16, 256, 0, SlotPlan(272, 1000, "queue cap")),               # tiny slots: capped
    (40 * MB, 1 << 30, 16, 256, 3, SlotPlan(3, 40 * MB, "flag")),                # the operator's count as is
    (40 * MB, 1 << 30, 32, 8, 0, SlotPlan(32, 40 * MB, "batch floor")),          # 26 from budget < 32 rows
])
def test_slot_plan_table(per_slot, budget, max_batch, max_waiting, requested, expected):
    plan = plan_slots(per_slot, budget_bytes=budget, max_batch=max_batch, max_waiting=max_waiting, requested=requested)
    assert plan == expected
    assert plan.total_bytes == plan.num_slots * per_slot


@pytest.mark.parametrize("kwargs", [dict(per_slot=0), dict(requested=-1), dict(max_batch=0), dict(budget_bytes=-1)])
def test_slot_plan_refuses_bad_input(kwargs):
    args = dict(per_slot=100, budget_bytes=1000, max_batch=1, max_waiting=1, requested=0) | kwargs
    with pytest.raises(ValueError):
        plan_slots(args.pop("per_slot"), **args)


def test_default_model_slot_size_and_count():
    """The numbers the docs state: 39.7 MB per rank-64 bf16 slot on SmolLM2, 27 in the default 1 GiB."""
    per_slot = bytes_per_slot(SMOLLM2_LINEARS, 64, 2)
    assert per_slot == 39_688_080
    defaults = EngineConfig()
    assert defaults.max_lora_rank == 64 and defaults.max_adapter_slots == 0
    assert defaults.adapter_slot_bytes == DEFAULT_SLOT_BYTES == 1 << 30
    plan = plan_slots(per_slot, budget_bytes=defaults.adapter_slot_bytes, max_batch=defaults.max_batch,
                      max_waiting=defaults.max_waiting)
    assert (plan.num_slots, plan.reason) == (27, "budget")
    assert slots_without_model(0, 16) == 16 and slots_without_model(5, 16) == 5


@pytest.fixture(scope="module")
def base(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def loaded(base):
    return load_model(base, dtype=torch.float32)


@pytest.fixture(scope="module")
def store(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    store = AdapterStore(root / "store")
    for rank in (8, 64):
        store.add(f"r{rank}", make_lora(base, root / f"r{rank}", seed=rank, r=rank))
    for i, path in enumerate(perturbed_copies(make_lora(base, root / "lora", seed=3), root / "copies", 4, seed=1)):
        store.add(f"lora-{i}", path)
    return store


def test_bytes_per_slot_is_what_the_layers_allocate(loaded, store):
    engine = Engine(loaded, EngineConfig(max_batch=2, max_seq_len=32, max_waiting=4, max_lora_rank=16,
                                         adapter_slot_bytes=0), store=store)
    slots = engine.adapters.table.num_slots
    assert slots == 2  # budget 0: the batch floor
    allocated = sum(b.nbytes for layer in engine.adapters.layers.values()
                    for b in (layer.lora_a, layer.lora_b, layer.ia3_in, layer.ia3_out, layer.lora_rank))
    assert allocated == (slots + 1) * bytes_per_slot(linear_shapes(loaded.model), 16, 4)  # + slot 0, the identity
    assert adapter_slot_plan(loaded, engine.config).num_slots == slots


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_rank_64_is_served_at_default_flags_next_to_rank_8(loaded, store):
    """Mixed ranks share one batch; each row is its adapter alone (ranks zero-padded in memory only)."""
    engine = Engine(loaded, EngineConfig(max_seq_len=64), store=store)
    assert engine.adapters.max_rank == 64
    solo = {}
    for name in ("r8", "r64"):
        request = engine.make_request([3, 4, 5], greedy(5), adapter=name)
        engine.generate([request])
        solo[name] = request.output_token_ids
    both = [engine.make_request([3, 4, 5], greedy(5), adapter=name) for name in ("r8", "r64", "r8")]
    engine.generate(both)
    assert [r.output_token_ids for r in both] == [solo["r8"], solo["r64"], solo["r8"]]
    assert solo["r8"] != solo["r64"]


def _run_until(engine, done, deadline_s=30.0):
    deadline = time.monotonic() + deadline_s
    while not done():
        if engine.scheduler.has_work():
            engine.step()
        else:
            time.sleep(0.001)
        assert time.monotonic() < deadline, "the engine made no progress"


def test_a_slow_store_read_does_not_hold_up_other_requests(loaded, store):
    engine = Engine(loaded, EngineConfig(max_batch=4, max_seq_len=64), store=store)
    release = threading.Event()
    load = engine.adapters.cpu._load_fn

    def slow_load(name):
        if name == "lora-0":
            release.wait(30)
        return load(name)

    engine.adapters.cpu._load_fn = slow_load
    slow = engine.make_request([1, 2, 3], greedy(3), adapter="lora-0")
    others = [engine.make_request([1, 2, 3], greedy(3)), engine.make_request([1, 2, 3], greedy(3), adapter="lora-1")]
    for r in [slow] + others:
        engine.submit(r, lambda o: None)
    engine._drain_inbox()
    _run_until(engine, lambda: all(r.status is Status.FINISHED for r in others))
    assert slow.status is Status.WAITING and not slow.output_token_ids
    release.set()
    _run_until(engine, lambda: slow.status is Status.FINISHED)
    assert len(slow.output_token_ids) == 3


def test_the_engine_thread_sleeps_while_only_adapter_loads_are_pending(loaded, store):
    """With nothing to run but a request whose store read is stuck, the step loop waits to be woken (by the
    read ending) instead of polling: it planned thousands of empty steps a second before, holding the GIL
    against the loading threads. The request is admitted as soon as the read ends."""
    engine = Engine(loaded, EngineConfig(max_batch=4, max_seq_len=64), store=store)
    release, reading = threading.Event(), threading.Event()
    load = engine.adapters.cpu._load_fn

    def slow_load(name):
        reading.set()
        release.wait(30)
        return load(name)

    engine.adapters.cpu._load_fn = slow_load
    plans = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: plans.append(time.monotonic()) or schedule()
    engine.start()
    try:
        done = threading.Event()
        request = engine.make_request([1, 2, 3], greedy(3), adapter="lora-3")
        engine.submit(request, lambda o: done.set() if o.finished else None)
        assert reading.wait(30)
        time.sleep(1.0)
        stalled = len(plans)
        assert stalled <= 2 + 1.0 / IDLE_RECHECK_S + 2, stalled  # woken by submit, then the recheck timer only
        released = time.monotonic()
        release.set()
        assert done.wait(30) and len(request.output_token_ids) == 3
        assert plans[stalled] - released < IDLE_RECHECK_S  # the load's end woke it, not the timer
    finally:
        release.set()
        engine.shutdown()


def test_a_slow_slot_copy_runs_off_the_engine_thread(loaded, store):
    engine = Engine(loaded, EngineConfig(max_batch=4, max_seq_len=64), store=store)
    pool = engine.adapters
    release, copying = threading.Event(), threading.Event()
    fill, threads = pool._fill, []

    def slow_fill(slot, adapter):
        threads.append(threading.current_thread().name)
        copying.set()
        release.wait(30)
        return fill(slot, adapter)

    pool._fill = slow_fill
    slow = engine.make_request([1, 2, 3], greedy(3), adapter="lora-2")
    engine.submit(slow, lambda o: None)
    engine._drain_inbox()
    _run_until(engine, copying.is_set)  # the store read finished; the copy has started and is stuck
    base = engine.make_request([1, 2, 3], greedy(3))
    engine.submit(base, lambda o: None)
    engine._drain_inbox()
    _run_until(engine, lambda: base.status is Status.FINISHED)  # steps ran while the copy was stuck
    assert slow.status is Status.WAITING
    release.set()
    _run_until(engine, lambda: slow.status is Status.FINISHED)
    assert threads and all(name.startswith("adapter-slot") for name in threads)
    # and the tokens are those of a slot written on the engine thread
    pool._fill, pool.async_slot_writes = fill, False
    pool.table.retire(slow.adapter_version)
    again = engine.make_request([1, 2, 3], greedy(3), adapter="lora-2")
    engine.generate([again])
    assert again.output_token_ids == slow.output_token_ids


def _stage_until(engine, done, deadline_s=30.0):
    """Stage the waiting requests (what each step does first) until done(), without running a step."""
    deadline = time.monotonic() + deadline_s
    while not done():
        engine.adapters.stage(engine.scheduler.waiting, engine.config.max_batch)
        time.sleep(0.002)
        assert time.monotonic() < deadline, "staging made no progress"


@pytest.mark.parametrize("slots, staged", [(4, 3), (2, 1), (1, 0)])  # num_slots - max_batch requests staged
def test_waiting_requests_get_their_slots_before_a_row(loaded, store, slots, staged):
    """Requests queued behind a full batch take their adapter's slot while they wait (store read and copy
    overlap the queue), at most num_slots - max_batch of them, in admission order; each is then admitted on
    the slot it holds, and its tokens are its adapter's alone. An abort while waiting gives the slot back."""
    config = EngineConfig(max_batch=1, max_seq_len=64, max_adapter_slots=slots)
    engine = Engine(loaded, config, store=store)
    names = ["lora-0", "lora-1", "lora-2", "r8", "r64"]
    requests = [engine.make_request([1, 2, 3], greedy(3), adapter=name) for name in names]
    for r in requests:
        engine.submit(r, lambda o: None)
    engine._drain_inbox()
    _stage_until(engine, lambda: all(r.slot for r in requests[:staged]))
    time.sleep(0.05)  # a request past the bound would have had time to get one too
    engine.adapters.stage(engine.scheduler.waiting, config.max_batch)
    assert [bool(r.slot) for r in requests] == [i < staged for i in range(len(names))]
    assert all(r.status is Status.WAITING for r in requests)
    table = engine.adapters.table
    referenced = lambda: sum(table.refs(slot) for slot in range(1, table.num_slots + 1))  # noqa: E731
    assert referenced() == staged
    if staged:
        aborted = requests[staged - 1]
        engine.abort(aborted.request_id)
        engine._drain_inbox()
        assert aborted.slot == 0 and referenced() == staged - 1
        requests.remove(aborted)
    _run_until(engine, lambda: all(r.status is Status.FINISHED for r in requests))
    assert referenced() == 0
    for r in requests:
        solo = Engine(loaded, EngineConfig(max_batch=1, max_seq_len=64), store=store)
        again = solo.make_request([1, 2, 3], greedy(3), adapter=r.adapter)
        solo.generate([again])
        assert r.output_token_ids == again.output_token_ids, r.adapter


def test_slot_wait_and_residency_metrics(loaded, store):
    engine = Engine(loaded, EngineConfig(max_batch=4, max_seq_len=64), store=store)
    engine.metrics = metrics = Metrics()
    requests = [engine.make_request([1, 2, 3], greedy(2), adapter=f"lora-{i % 4}") for i in range(8)]
    engine.generate(requests)
    engine.generate([engine.make_request([1, 2, 3], greedy(2), adapter=f"lora-{i}") for i in range(4)])
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render()[0].decode())
               for s in family.samples}
    assert samples[("adapter_server_adapter_slot_wait_seconds_count", ())] == 12
    misses = samples[("adapter_server_adapter_cache_misses_total", ())]
    assert samples[("adapter_server_adapter_cache_hits_total", ())] + misses == 12
    assert 4 <= misses <= 8  # every first request of an adapter waited; the last four found theirs resident
    assert samples[("adapter_server_adapter_slot_wait_seconds_sum", ())] > 0  # the first of each adapter waited
    assert samples[("adapter_server_adapters_resident", (("tier", "device"),))] == 4
    assert samples[("adapter_server_adapters_resident", (("tier", "cpu"),))] == 4


def test_a_store_of_1000_adapters_lists_and_looks_up_without_rereading(tmp_path, monkeypatch):
    """1,000 adapters: the index is parsed once; lookups are dict reads and the sorted list is built once."""
    root = tmp_path / "store"
    (root / "adapters").mkdir(parents=True)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    records = {}
    for i in range(1000):
        name = f"a-{(i * 7919) % 1000:04d}"
        (root / "adapters" / name).mkdir()
        os.link(weights, root / "adapters" / name / "adapter_model.safetensors")
        records[name] = {"name": name, "kind": "lora", "rank": 8 * (1 + i % 8), "target_modules": ["q_proj"],
                         "base_model": None, "num_virtual_tokens": 0, "size_bytes": 1, "sha256": f"{i:064x}",
                         "created_at": "2026-12-03T00:00:00+00:00"}
    (root / "index.json").write_text(json.dumps({"version": 1, "adapters": records}))
    store = AdapterStore(root)
    store._parsed = None  # forget the parse of the start-up recovery
    parses = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text, **kw: parses.append(1) or real_loads(text, **kw))
    listed = store.list()
    assert [r.name for r in listed] == sorted(records) and len(store) == 1000
    for name in records:
        assert store.get(name).name == name
    assert store.list() == listed and store._parsed[2] is not None
    assert len(parses) == 1


def test_the_benchmark_store_holds_every_rank_and_each_adapter_loads(base, tmp_path):
    """loadtest.bench_many_adapters builds its store by hard links and a direct index: every record must be
    what the store and the loader see."""
    from adapters.format import BaseSpec, load_adapter
    from loadtest.bench_many_adapters import RANKS, adapter_names, build_store, rank_of
    from transformers import AutoConfig

    root = build_store(base, tmp_path, 12, 2, seed=0)
    store = AdapterStore(root)
    assert [r.name for r in store.list()] == adapter_names(12)
    assert [r.rank for r in store.list()] == [rank_of(n) for n in adapter_names(12)] == list(RANKS) * 3
    spec = BaseSpec.from_hf_config(AutoConfig.from_pretrained(base), Path(base).name)
    for name in ("a0003", "a0007"):  # rank 64, two different weight files
        assert load_adapter(store.path(name), spec, max_rank=64, name=name).rank == 64
    assert store.get("a0003").sha256 != store.get("a0007").sha256


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread CPU times come from Linux /proc")
def test_the_benchmark_reads_cpu_time_per_named_thread():
    """bench_many_adapters splits the server's CPU by OS thread name; our threads name themselves."""
    from loadtest.bench_many_adapters import thread_cpu
    from server.engine.threads import inline_parallel_ops

    burned, done = threading.Event(), threading.Event()

    def burn():
        inline_parallel_ops()  # what the adapter threads run first: names the OS thread
        start = time.thread_time()
        while time.thread_time() - start < 0.2:
            pass
        burned.set()
        done.wait(30)  # alive (and listed in /proc) until read

    before = thread_cpu(os.getpid()).get("adapter-load", 0.0)
    worker = threading.Thread(target=burn, name="adapter-load_7")
    worker.start()
    assert burned.wait(30)
    during = thread_cpu(os.getpid())
    done.set()
    worker.join()
    assert during.get("adapter-load", 0.0) - before >= 0.15, during
