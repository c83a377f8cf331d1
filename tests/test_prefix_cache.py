"""Paged KV and prefix caching through the engine: greedy outputs identical with and without the cache for
every adapter kind, compositions, merged adapters, chunked prefill across block boundaries and preempted
requests; overwritten adapters never reuse old blocks; prompt-logprob requests still score every token."""
import pytest
import torch

from adapters.composition import Composition, Member
from adapters.store import AdapterStore
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from tests.peft_adapters import make_dora, make_ia3, make_lora, make_prefix, make_prompt

BLOCK = 4
SYSTEM = [(7 * i + 3) % 200 + 10 for i in range(21)]  # a shared "system prompt" of 21 tokens: 5 full blocks + 1
SUFFIXES = [[5, 72, 101], [108, 111, 32, 119, 111, 114], [100, 9]]


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    base = tiny_checkpoints["llama"]
    root = tmp_path_factory.mktemp("prefix-cache")
    paths = {
        "lora": make_lora(base, root / "lora", seed=61),
        "lora2": make_lora(base, root / "lora2", seed=62, targets=("q_proj", "v_proj", "gate_proj")),
        "dora": make_dora(base, root / "dora", seed=63),
        "ia3": make_ia3(base, root / "ia3", seed=64),
        "prefix": make_prefix(base, root / "prefix", seed=65, num_virtual_tokens=6),
        "prompt": make_prompt(base, root / "prompt", seed=66, num_virtual_tokens=5),
        "ptuning": make_prompt(base, root / "ptuning", seed=67, num_virtual_tokens=4, p_tuning=True),
    }
    store = AdapterStore(root / "store")
    for name, path in paths.items():
        store.add(name, path)
    return store, paths, load_model(base, dtype=torch.float32)


def engine_for(setup, caching: bool, **overrides) -> Engine:
    store, _, loaded = setup
    config = {"max_batch": 4, "max_seq_len": 128, "max_adapter_slots": 4, "merge_threshold": 2.0,
              "kv_block_size": BLOCK, "enable_prefix_caching": caching, **overrides}
    return Engine(loaded, EngineConfig(**config), store=store)


def greedy(n: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def run_turns(engine: Engine, adapter=None, composition=None, n: int = 8) -> tuple[list[list[int]], list[int]]:
    """One request per suffix, one after another (each sees the cache the earlier ones left): their greedy
    outputs and cached prompt tokens."""
    outputs, cached = [], []
    for suffix in SUFFIXES:
        request = engine.make_request(SYSTEM + suffix, greedy(n), adapter=adapter, composition=composition)
        result = engine.generate([request])[request.request_id]
        outputs.append(request.output_token_ids)
        cached.append(result[-1].cached_tokens)
    return outputs, cached


TARGETS = [
    (None, None), ("lora", None), ("dora", None), ("ia3", None), ("prefix", None), ("prompt", None),
    ("ptuning", None),
    (None, Composition((Member("lora", 0.7), Member("lora2", 0.3)), "cat")),
    (None, Composition((Member("lora", 1.0), Member("ia3", 1.0), Member("prefix", 1.0)), "cat")),
]


@pytest.mark.parametrize("adapter, composition", TARGETS,
                         ids=[a or (c.describe() if c else "base") for a, c in TARGETS])
def test_greedy_identical_with_and_without_the_cache(setup, adapter, composition):
    expected, none_cached = run_turns(engine_for(setup, caching=False), adapter, composition)
    got, cached = run_turns(engine_for(setup, caching=True), adapter, composition)
    assert got == expected
    assert none_cached == [0, 0, 0]
    prefix_len = {"prefix": 6, "prompt": 5, "ptuning": 4}.get(adapter, 6 if composition and len(composition.members) == 3
                                                                 else 0)
    shared = (prefix_len + len(SYSTEM)) // BLOCK * BLOCK - prefix_len  # whole blocks of prefix + system prompt
    assert cached[0] == 0 and cached[1] == cached[2] == shared > 0


def test_chunked_prefill_across_block_boundaries_and_batched_hits(setup):
    """Chunks of 7 tokens over blocks of 4, several requests of one prefix admitted together."""
    prompts = [SYSTEM + s for s in SUFFIXES] * 2
    results = []
    for caching in (False, True):
        engine = engine_for(setup, caching, max_prefill_tokens=7, max_batch=3)
        first = engine.make_request(prompts[0], greedy(4), adapter="lora")
        engine.generate([first])
        requests = [engine.make_request(p, greedy(6), adapter="lora") for p in prompts]
        engine.generate(requests)
        results.append(([r.output_token_ids for r in requests], [r.num_cached_prompt_tokens for r in requests]))
    (expected, _), (got, cached) = results
    assert got == expected and all(c > 0 for c in cached)


def test_an_overwritten_adapter_never_reuses_its_old_blocks(setup, tmp_path):
    store, paths, loaded = setup
    prompt = SYSTEM + SUFFIXES[0]
    fresh = engine_for(setup, caching=False)     # the new weights' output, from an engine without a cache
    reference = fresh.make_request(prompt, greedy(), adapter="lora2")
    fresh.generate([reference])
    engine = engine_for(setup, caching=True)
    store.add("moving", paths["lora"])
    engine.invalidate_adapter("moving")
    warm = engine.make_request(prompt, greedy(), adapter="moving")
    engine.generate([warm])
    again = engine.make_request(prompt, greedy(), adapter="moving")
    engine.generate([again])
    assert again.num_cached_prompt_tokens > 0 and again.output_token_ids == warm.output_token_ids

    store.add("moving", paths["lora2"], overwrite=True)   # new weights under the same name
    engine.invalidate_adapter("moving")
    after = engine.make_request(prompt, greedy(), adapter="moving")
    engine.generate([after])
    assert after.num_cached_prompt_tokens == 0 and after.output_token_ids == reference.output_token_ids

    store.add("moving", paths["lora2"], overwrite=True)   # the same bytes again: still a new version here
    engine.invalidate_adapter("moving")
    same = engine.make_request(prompt, greedy(), adapter="moving")
    engine.generate([same])
    assert same.num_cached_prompt_tokens == 0 and same.output_token_ids == reference.output_token_ids
    store.delete("moving")
    engine.invalidate_adapter("moving")


def test_merged_adapter_identical_with_and_without_the_cache(setup):
    """The merge policy merges the only adapter running; cached K/V never cross a merge or unmerge."""
    results = []
    for caching in (False, True):
        engine = engine_for(setup, caching, merge_threshold=1.0, unmerge_threshold=0.9, merge_patience=1,
                            merge_min_batch=1)
        outputs = []
        for round_ in range(3):
            requests = [engine.make_request(SYSTEM + s, greedy(6), adapter="lora") for s in SUFFIXES]
            requests.append(engine.make_request(SYSTEM + SUFFIXES[round_], greedy(6)))  # a base row: unmerges
            engine.generate(requests)
            outputs += [r.output_token_ids for r in requests]
        results.append(outputs)
    assert results[0] == results[1]


def pool_bytes(loaded, blocks: int) -> int:
    args = loaded.model.args
    return blocks * KVCache.bytes_per_block(args.num_layers, args.num_kv_heads, args.head_dim, BLOCK, torch.float32)


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("hold_first", [False, True])
def test_preempted_requests_resume_with_identical_streams(setup, caching, hold_first):
    """A pool of 14 usable blocks (56 positions) for 4 requests that grow to 37 positions each: the newest are
    preempted and recomputed; every stream carries each token once, and greedy outputs equal solo runs.
    hold_first: admission holds the first request back until the second runs (as when the first's adapter slot
    write is still in flight when it asks, and done when the second asks), so the first is admitted after the
    second, becomes the newest row and is preempted right after its prompt sampled its first token."""
    _, _, loaded = setup
    prompts = [SYSTEM + s for s in SUFFIXES] + [list(range(40, 61))]
    solo = []
    for p in prompts:
        engine = engine_for(setup, caching=False)
        request = engine.make_request(p, greedy(12), adapter="lora")
        engine.generate([request])
        solo.append(request.output_token_ids)
    engine = engine_for(setup, caching, kv_cache_bytes=pool_bytes(loaded, 15), max_prefill_tokens=16)
    requests = [engine.make_request(p, greedy(12), adapter="lora") for p in prompts]
    if hold_first:
        scheduler, can_admit = engine.scheduler, engine.scheduler.can_admit

        def second_first(request: Request) -> bool:
            return (request is not requests[0] or requests[1] in scheduler.running) and can_admit(request)
        engine.scheduler.can_admit = second_first
    outputs = engine.generate(requests)
    assert engine.scheduler.stats.preemptions > 0
    assert [r.output_token_ids for r in requests] == solo
    for r in requests:
        streamed = [t for o in outputs[r.request_id] for t in o.token_ids]
        assert streamed == r.output_token_ids and outputs[r.request_id][-1].finished
    assert engine.scheduler.blocks.num_used == 0


def test_prompt_logprobs_are_complete_after_a_cache_hit(setup):
    engine = engine_for(setup, caching=True)
    prompt = SYSTEM + SUFFIXES[1]
    warm = engine.make_request(prompt, greedy(2))
    engine.generate([warm])
    scored = engine.make_request(prompt, greedy(2, prompt_logprobs=1))
    out = engine.generate([scored])[scored.request_id]
    reference_engine = engine_for(setup, caching=False)
    reference = reference_engine.make_request(prompt, greedy(2, prompt_logprobs=1))
    expected = reference_engine.generate([reference])[reference.request_id]
    got, want = out[0].prompt_logprobs, expected[0].prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    assert [e.token_id for e in got[1:]] == [e.token_id for e in want[1:]]
    assert [e.logprob for e in got[1:]] == pytest.approx([e.logprob for e in want[1:]], abs=1e-5)
    assert scored.output_token_ids == reference.output_token_ids


def test_max_seq_len_defaults_to_the_model_context_and_the_pool_bounds_it(setup):
    _, _, loaded = setup
    engine = Engine(loaded, EngineConfig(max_batch=2))
    assert engine.max_seq_len == loaded.model.args.max_position_embeddings == 512
    long_prompt = [10 + i % 250 for i in range(500)]
    request = engine.make_request(long_prompt, greedy(4))
    engine.generate([request])
    assert len(request.output_token_ids) == 4
    small = Engine(loaded, EngineConfig(max_batch=2, kv_block_size=BLOCK, kv_cache_bytes=pool_bytes(loaded, 11)))
    assert small.max_seq_len == 10 * BLOCK


@pytest.mark.parametrize("overrides, message", [
    ({"kv_block_size": 12}, "power of two"),
    ({"kv_cache_bytes": 10}, "at least 2"),
])
def test_bad_pool_settings(setup, overrides, message):
    with pytest.raises(ValueError, match=message):
        engine_for(setup, True, **overrides)
