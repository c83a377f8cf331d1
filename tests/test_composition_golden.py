"""Per-request composition (adapters.composition) against PEFT.

Oracles, all PEFT 0.21 on the same fp32 base:
* weighted LoRAs: ``add_weighted_adapter(["a", "b"], weights, combination_type="cat" | "linear")``;
* several families: the LoRA (or the weighted mix) ``merge_and_unload()``-ed into the base, an IA3 loaded on
  that and merged, the prefix / prompt-tuning adapter loaded last.
Each composition is held to 1e-4 on the fp32 logits and to PEFT's greedy tokens, batched with single-adapter and
base rows, and merged on demand where it is mergeable.
"""
import json
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.composition import Composition, Member
from adapters.store import AdapterStore
from server.engine.merge_policy import MergeDecision
from server.engine.request import Request, RequestError, SamplingParams
from server.model.loader import load_model
from tests.peft_adapters import make_dora, make_ia3, make_lora, make_prefix, make_prompt
from tests.test_adapters_golden import NEW_TOKENS, PROMPT, engine_for, peft_greedy


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    base = tiny_checkpoints["llama"]
    root = tmp_path_factory.mktemp("compose")
    paths = {
        "a": make_lora(base, root / "a", seed=41),
        "b": make_lora(base, root / "b", seed=42, targets=("q_proj", "v_proj", "gate_proj", "down_proj")),
        "c": make_lora(base, root / "c", seed=43, r=4, use_rslora=True),
        "biased": make_lora(base, root / "biased", seed=44, lora_bias=True),  # refused in sums; served: see qwen2
        "dora": make_dora(base, root / "dora", seed=45),
        "ia3": make_ia3(base, root / "ia3", seed=46),
        "ia3-2": make_ia3(base, root / "ia3-2", seed=47),
        "prefix": make_prefix(base, root / "prefix", seed=48),
        "prompt": make_prompt(base, root / "prompt", seed=49),
    }
    store = AdapterStore(root / "store")
    for name, path in paths.items():
        store.add(name, path)
    return base, store, paths, load_model(base, dtype=torch.float32)


def comp(members: dict[str, float], combination: str = "cat") -> Composition:
    return Composition(tuple(Member(n, w) for n, w in members.items()), combination)


def _acquire(engine, request):
    engine.adapters.prefetch_request(request)
    deadline = time.monotonic() + 30
    while not engine.adapters.try_acquire(request):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def engine_logits(engine, composition: Composition | None) -> torch.Tensor:
    request = engine.make_request(PROMPT, SamplingParams(max_tokens=1, temperature=0.0), composition=composition)
    _acquire(engine, request)
    prefix = engine.adapters.prefix_for(request)
    if prefix is not None:
        engine.runner.cache.write_prefix(0, *prefix)
    with engine.adapters.mapped([request]):
        logits = engine.runner.prefill(0, [PROMPT], [request.prefix_len])[0]
    engine.adapters.release(request)
    return logits


def engine_greedy(engine, rows: list[tuple[str | None, Composition | None, list[int]]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    requests = [engine.make_request(p, params, adapter=a, composition=c) for a, c, p in rows]
    engine.generate(requests)
    return [r.output_token_ids for r in requests]


def kind_of(path) -> str:
    """lora, dora, ia3 or virtual, from the PEFT config."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    if config["peft_type"] == "LORA":
        return "dora" if config.get("use_dora") else "lora"
    return "ia3" if config["peft_type"] == "IA3" else "virtual"


def peft_oracle(base, paths, composition: Composition):
    """PEFT applying the composition's adapters one over another (module docstring)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    loras = [m for m in composition.members if kind_of(paths[m.name]) in ("lora", "dora")]
    if loras:
        model = PeftModel.from_pretrained(model, paths[loras[0].name], adapter_name=loras[0].name)
        for m in loras[1:]:
            model.load_adapter(paths[m.name], adapter_name=m.name)
        if len(loras) > 1 or loras[0].weight != 1.0:
            model.add_weighted_adapter([m.name for m in loras], [m.weight for m in loras], "mix",
                                       combination_type=composition.combination)
            model.set_adapter("mix")
            model = model.merge_and_unload(adapter_names=["mix"])
        else:
            model = model.merge_and_unload()
    for m in composition.members:
        if kind_of(paths[m.name]) == "ia3":
            model = PeftModel.from_pretrained(model, paths[m.name]).merge_and_unload()
    for m in composition.members:
        if kind_of(paths[m.name]) == "virtual":
            model = PeftModel.from_pretrained(model, paths[m.name])
    return model.eval()


CASES = {
    "cat": comp({"a": 0.7, "b": 0.3}),
    "cat-negative": comp({"a": 1.0, "b": -0.5, "c": 0.8}),
    "linear": comp({"a": 0.7, "b": 0.3}, "linear"),
    "one-lora-scaled-rslora": comp({"c": 0.5}),
    "lora+ia3": comp({"a": 1.0, "ia3": 1.0}),
    "dora+ia3+prefix": comp({"dora": 1.0, "ia3": 1.0, "prefix": 1.0}),
    "mix+ia3+prompt": comp({"a": 0.6, "b": 0.9, "ia3": 1.0, "prompt": 1.0}),
    "ia3+prefix": comp({"ia3": 1.0, "prefix": 1.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_composition_matches_peft(setup, case):
    base, store, paths, loaded = setup
    composition = CASES[case]
    engine = engine_for(loaded, store, max_lora_rank=32)
    reference = peft_oracle(base, paths, composition)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    ours = engine_logits(engine, composition)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    for member in composition.members:  # every member visibly matters: leaving it out changes the logits
        rest = {m.name: m.weight for m in composition.members if m is not member}
        without = engine_logits(engine, comp(rest, composition.combination) if rest else None)
        assert (ours - without).abs().max() > 0.02, member.name
    assert engine_greedy(engine, [(None, composition, PROMPT)])[0] == peft_greedy(reference)


def test_bias_terms_compose_on_a_base_with_biases(tiny_checkpoints, tmp_path):
    """Qwen2 (q/k/v biases): a LoRA with lora_bias and trained base biases (bias="all"), an IA3 and a prompt-tuning
    adapter; PEFT can merge such a LoRA only where the base has biases, so the oracle needs this base."""
    base = tiny_checkpoints["qwen2"]
    paths = {"biased": make_lora(base, tmp_path / "biased", seed=51, targets=("q_proj", "k_proj", "v_proj"),
                                 lora_bias=True, bias="all"),
             "ia3": make_ia3(base, tmp_path / "ia3", seed=52), "prompt": make_prompt(base, tmp_path / "prompt", seed=53)}
    store = AdapterStore(tmp_path / "store")
    for name, path in paths.items():
        store.add(name, path)
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    composition = comp({"biased": 1.0, "ia3": 1.0, "prompt": 1.0})
    reference = peft_oracle(base, paths, composition)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(engine_logits(engine, composition), expected, atol=1e-4, rtol=0)
    assert engine_greedy(engine, [(None, composition, PROMPT)])[0] == peft_greedy(reference)


def test_compositions_batch_with_single_adapter_and_base_rows(setup):
    base, store, paths, loaded = setup
    rows = [(None, None), ("a", None), (None, CASES["cat"]), ("ia3", None), (None, CASES["mix+ia3+prompt"]),
            ("prefix", None), (None, CASES["linear"]), (None, CASES["dora+ia3+prefix"]), (None, None),
            (None, CASES["cat"])]
    rows = [(a, c, PROMPT[: 5 + i]) for i, (a, c) in enumerate(rows)]
    solo = [engine_greedy(engine_for(loaded, store, max_batch=1, max_lora_rank=32), [row])[0] for row in rows]
    mixed = engine_greedy(engine_for(loaded, store, max_batch=10, max_adapter_slots=8, max_lora_rank=32), rows)
    assert mixed == solo
    assert len({tuple(t) for t in solo}) > 5


def test_a_composition_takes_one_slot_shared_by_its_requests(setup):
    base, store, paths, loaded = setup
    engine = engine_for(loaded, store, max_lora_rank=32)
    first = engine.make_request(PROMPT, SamplingParams(max_tokens=1), composition=CASES["cat"])
    again = engine.make_request(PROMPT, SamplingParams(max_tokens=1), composition=comp({"a": 0.7, "b": 0.3}))
    other = engine.make_request(PROMPT, SamplingParams(max_tokens=1), composition=comp({"a": 0.7, "b": 0.4}))
    for request in (first, again, other):
        _acquire(engine, request)
    assert first.slot == again.slot != other.slot and engine.adapters.table.in_use == 2
    assert first.adapter is None and first.composition == CASES["cat"]
    single = engine.make_request(PROMPT, SamplingParams(max_tokens=1), composition=comp({"a": 1.0}))
    assert single.composition is None and single.adapter == "a"  # one adapter at weight 1 is served as itself


def test_overwriting_a_member_retires_its_compositions(setup, tmp_path):
    base, store, paths, loaded = setup
    engine = engine_for(loaded, store, max_lora_rank=32)
    store.add("member", paths["a"], overwrite=True)
    composition = comp({"member": 0.5, "ia3": 1.0})
    before = engine_logits(engine, composition)
    store.add("member", make_lora(base, tmp_path / "new", seed=99), overwrite=True)
    engine.invalidate_adapter("member")
    after = engine_logits(engine, composition)
    assert (before - after).abs().max() > 0.02
    with torch.no_grad():
        paths2 = {**paths, "a": tmp_path / "new"}
        expected = peft_oracle(base, paths2, comp({"a": 0.5, "ia3": 1.0}))(input_ids=torch.tensor([PROMPT])).logits
    torch.testing.assert_close(after, expected[0, -1], atol=1e-4, rtol=0)


def test_a_hot_composition_merges_exactly(setup):
    """LoRA mix + IA3 folds into the base (l_out (W + sBA) diag(l_in)); rows of other adapters stay exact."""
    base, store, paths, loaded = setup
    engine = engine_for(loaded, store, max_lora_rank=32)
    composition = comp({"a": 0.6, "b": 0.9, "ia3": 1.0})
    rows = [(None, composition, PROMPT), ("b", None, PROMPT[:7]), (None, None, PROMPT[:9])]
    unmerged = engine_greedy(engine, rows)
    expected = engine_logits(engine, composition)
    request = engine.make_request(PROMPT, SamplingParams(max_tokens=1), composition=composition)
    _acquire(engine, request)
    engine.adapters._apply_merge(MergeDecision("merge", request.adapter_version))
    assert engine.adapters.merged_slot == request.slot
    engine.adapters.release(request)
    torch.testing.assert_close(engine_logits(engine, composition), expected, atol=1e-4, rtol=0)
    assert engine_greedy(engine, rows) == unmerged


REFUSED = {
    "two IA3": (comp({"ia3": 1.0, "ia3-2": 1.0}), "at most one"),
    "two virtual": (comp({"prefix": 1.0, "prompt": 1.0}), "at most one"),
    "weighted IA3": (comp({"a": 1.0, "ia3": 0.5}), "weights apply to LoRA adapters only"),
    "weighted DoRA": (comp({"dora": 0.5}), "DoRA"),
    "DoRA in a sum": (comp({"dora": 1.0, "a": 1.0}), "DoRA"),
    "bias in a sum": (comp({"biased": 1.0, "a": 0.5}), "bias"),
    "linear over ranks": (comp({"a": 1.0, "c": 1.0}, "linear"), "one rank"),
    "cat above the rank": (comp({"a": 1.0, "b": 1.0}), "--max-lora-rank"),
    "unknown combination": (comp({"a": 1.0, "b": 1.0}, "svd"), "adapter_combination"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_compositions_that_cannot_be_served_are_refused(setup, case):
    base, store, paths, loaded = setup
    engine = engine_for(loaded, store, max_lora_rank=8 if case == "cat above the rank" else 32)
    composition, message = REFUSED[case]
    with pytest.raises(RequestError, match=message):
        engine.make_request(PROMPT, SamplingParams(max_tokens=1), composition=composition)
    with pytest.raises(RequestError, match="not both"):
        engine.make_request(PROMPT, SamplingParams(max_tokens=1), adapter="a", composition=CASES["cat"])
    assert isinstance(Request(PROMPT, SamplingParams()).composition, type(None))
