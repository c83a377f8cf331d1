"""Prompt tuning and P-tuning served against PEFT: virtual-token embeddings before the prompt (positions 0..P-1,
prompt from P), fp32 logits and greedy tokens, alone and mixed with every other kind in one batch."""
import pytest
import torch

from adapters.format import PromptAdapter, inspect_adapter_dir
from adapters.store import AdapterStore
from server.model.loader import load_model
from tests.peft_adapters import make_dora, make_ia3, make_lora, make_prefix, make_prompt
from tests.test_adapters_golden import (PROMPT, engine_for, generate, greedy_request, peft_greedy, peft_reference,
                                        prefill_logits)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_checkpoints, tmp_path_factory):
    arch = request.param
    base = tiny_checkpoints[arch]
    root = tmp_path_factory.mktemp(f"prompt-{arch}")
    paths = {
        "prompt": make_prompt(base, root / "prompt", seed=31),
        "p-tuning": make_prompt(base, root / "ptune", seed=32, num_virtual_tokens=4, p_tuning=True),
        "lora": make_lora(base, root / "lora", seed=33),
        "ia3": make_ia3(base, root / "ia3", seed=34),
        "prefix": make_prefix(base, root / "prefix", seed=35),
        "dora": make_dora(base, root / "dora", seed=36),
    }
    store = AdapterStore(root / "store")
    for name, path in paths.items():
        store.add(name, path)
    return arch, base, store, paths


def test_prompt_kinds_are_indexed_with_their_virtual_tokens(setup):
    arch, base, store, paths = setup
    assert inspect_adapter_dir(paths["prompt"])["num_virtual_tokens"] == 6
    assert (store.get("p-tuning").kind, store.get("p-tuning").num_virtual_tokens) == ("prompt", 4)
    assert PromptAdapter.matches({"peft_type": "P_TUNING"}) and not PromptAdapter.mergeable


@pytest.mark.parametrize("name", ["prompt", "p-tuning"])
def test_prompt_tuning_matches_peft_fp32(setup, name):
    arch, base, store, paths = setup
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    reference = peft_reference(base, paths[name])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    ours = prefill_logits(engine, name)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert (ours - prefill_logits(engine, None)).abs().max() > 0.05, "the adapter must visibly change the output"
    assert generate(engine, [greedy_request(name)])[0] == peft_greedy(reference)


def test_mixed_batch_with_prompt_tuning_gives_each_row_its_solo_output(setup):
    arch, base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32)
    names = [None, "prompt", "lora", "ia3", "prefix", "p-tuning", "dora", "prompt"]
    prompts = [PROMPT[: 5 + i] for i in range(len(names))]
    solo = [generate(engine_for(loaded, store, max_batch=1, max_adapter_slots=6), [greedy_request(n, p)])[0]
            for n, p in zip(names, prompts)]
    mixed = generate(engine_for(loaded, store, max_adapter_slots=6), [greedy_request(n, p) for n, p in
                                                                     zip(names, prompts)])
    assert mixed == solo
    assert len({tuple(t) for t in solo}) > 3


def test_prompt_tuning_beside_a_merged_adapter(setup):
    """Virtual tokens encoded while another adapter is merged still see the base alone."""
    arch, base, store, paths = setup
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    expected = prefill_logits(engine, "prompt")
    other = engine_for(load_model(base, dtype=torch.float32), store)
    lora = other.make_request(PROMPT, greedy_request("lora").params, adapter="lora")
    prefill_logits(other, "lora")
    from server.engine.merge_policy import MergeDecision
    other.adapters._apply_merge(MergeDecision("merge", lora.adapter_version))
    assert other.adapters.merged_slot
    torch.testing.assert_close(prefill_logits(other, "prompt"), expected, atol=1e-5, rtol=0)
