"""Bias deltas served against PEFT: LoRA with lora_bias=True (delta scaling * b_B, on a base with and without
biases), bias="all" / "lora_only" (trained q/k/v biases of Qwen2 replace the base's, including modules LoRA does
not wrap) and DoRA with bias="all" (PEFT refuses DoRA with lora_bias, and so do we); fp32 logits and greedy tokens, a mixed batch with other kinds equal to solo, and
merge (folded weights and biases equal PEFT's merge_and_unload; merged serving gives the same tokens). The trained
biases are randomised, so a server that ignored them would fail."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from adapters.format import AdapterError, BaseSpec, load_adapter
from adapters.store import AdapterStore
from server.config import EngineConfig
from server.engine.engine import Engine
from server.model.loader import load_model
from tests.peft_adapters import make_dora, make_ia3, make_lora, make_prefix
from tests.test_adapters_golden import (PROMPT, engine_for, generate, greedy_request, peft_greedy, peft_reference,
                                        prefill_logits)

BIAS_KINDS = ["lora-bias", "lora-all", "lora-only", "dora-bias-all"]


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    base = tiny_checkpoints["qwen2"]
    root = tmp_path_factory.mktemp("bias")
    paths = {
        "lora-bias": make_lora(base, root / "lb", seed=31, targets=("q_proj", "v_proj", "o_proj", "up_proj"),
                               lora_bias=True),
        "lora-all": make_lora(base, root / "la", seed=32, targets=("q_proj", "o_proj"), bias="all"),
        "lora-only": make_lora(base, root / "lo", seed=33, targets=("k_proj", "v_proj", "down_proj"), bias="lora_only"),
        "dora-bias-all": make_dora(base, root / "db", seed=34, targets=("q_proj", "v_proj", "o_proj"), bias="all"),
        "lora": make_lora(base, root / "lora", seed=35),
        "ia3": make_ia3(base, root / "ia3", seed=36),
        "prefix": make_prefix(base, root / "prefix", seed=37),
    }
    store = AdapterStore(root / "store")
    for name, path in paths.items():
        store.add(name, path)
    return base, store, paths


def spec(base) -> BaseSpec:
    return BaseSpec.from_hf_config(AutoConfig.from_pretrained(base), base.name)


def test_bias_terms_are_read(setup):
    base, store, paths = setup
    lb = load_adapter(paths["lora-bias"], spec(base), max_rank=8)
    assert all(w.bias is not None and w.bias.abs().max() > 0 for w in lb.lora.values()) and not lb.base_bias
    la = load_adapter(paths["lora-all"], spec(base), max_rank=8)
    # every bias of the model: q/k/v of both layers, k and v untargeted by LoRA
    assert sorted(la.base_bias) == [(i, m) for i in range(2) for m in ("k_proj", "q_proj", "v_proj")]
    lo = load_adapter(paths["lora-only"], spec(base), max_rank=8)
    assert sorted(lo.base_bias) == [(i, m) for i in range(2) for m in ("k_proj", "v_proj")]


@pytest.mark.parametrize("name", BIAS_KINDS)
def test_bias_matches_peft_fp32(setup, name):
    base, store, paths = setup
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    reference = peft_reference(base, paths[name])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    ours = prefill_logits(engine, name)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert generate(engine, [greedy_request(name)])[0] == peft_greedy(reference)


@pytest.mark.parametrize("name", BIAS_KINDS)
def test_bias_is_not_ignored(setup, tmp_path, name):
    """The same adapter with its bias tensors dropped (and the config saying so) gives other logits."""
    base, store, paths = setup
    src = paths[name]
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(bias="none", lora_bias=False)
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    (stripped / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items() if not k.endswith(".bias")},
              str(stripped / "adapter_model.safetensors"), metadata={"format": "pt"})
    store.add(f"{name}-stripped", stripped)
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    assert (prefill_logits(engine, name) - prefill_logits(engine, f"{name}-stripped")).abs().max() > 0.05


def test_lora_bias_on_a_base_without_biases(tiny_checkpoints, tmp_path):
    """PEFT allows lora_bias on a linear with no bias (it only cannot merge): served, and merged with a bias of its
    own."""
    base = tiny_checkpoints["llama"]
    path = make_lora(base, tmp_path / "lb", seed=38, targets=("q_proj", "down_proj"), lora_bias=True)
    store = AdapterStore(tmp_path / "store")
    store.add("lb", path)
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    reference = peft_reference(base, path)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(prefill_logits(engine, "lb"), expected, atol=1e-4, rtol=0)
    assert generate(engine, [greedy_request("lb")])[0] == peft_greedy(reference)
    hot = Engine(load_model(base, dtype=torch.float32),
                 EngineConfig(max_batch=4, max_seq_len=96, merge_threshold=0.5, unmerge_threshold=0.01,
                              merge_patience=1, merge_min_batch=1), store=store)
    requests = [hot.make_request(PROMPT, greedy_request("lb").params, adapter="lb") for _ in range(3)]
    hot.generate(requests)
    assert hot.adapters.merged_slot
    assert all(r.output_token_ids == peft_greedy(reference) for r in requests)


def test_mixed_batch_with_bias_adapters_gives_each_row_its_solo_output(setup):
    base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32)
    names = [None, "lora-bias", "ia3", "lora-all", "prefix", "dora-bias-all", "lora", "lora-only"]
    prompts = [PROMPT[: 5 + i] for i in range(len(names))]
    solo = [generate(engine_for(loaded, store, max_batch=1), [greedy_request(n, p)])[0]
            for n, p in zip(names, prompts)]
    mixed = generate(engine_for(loaded, store, max_adapter_slots=8), [greedy_request(n, p)
                                                                       for n, p in zip(names, prompts)])
    assert mixed == solo
    assert len({tuple(t) for t in solo}) > 4


@pytest.mark.parametrize("name", ["lora-all", "lora-only", "dora-bias-all"])  # PEFT cannot merge lora-bias here
def test_bias_folds_like_peft_merge(setup, name):
    """AdapterLinear.folded equals PEFT's merge_and_unload, biases included (bias-only modules too). (lora-bias
    targets o_proj/up_proj, which have no base bias: PEFT refuses to merge it; we merge it with a bias of its own,
    checked by serving in test_merged_serving_equals_peft.)"""
    base, store, paths = setup
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    request = engine.make_request(PROMPT, greedy_request(name).params, adapter=name)
    prefill_logits(engine, name)
    slot = engine.adapters.table.lookup(request.adapter_version)
    merged = peft_reference(base, paths[name]).merge_and_unload()
    changed_bias = 0
    for (i, module), layer in engine.adapters.layers.items():
        parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        want = getattr(getattr(merged.model.layers[i], parent), module)
        folded = layer.folded(slot)
        if folded is None:
            torch.testing.assert_close(layer.base.weight, want.weight, atol=0, rtol=0)
            continue
        torch.testing.assert_close(folded[0], want.weight, atol=1e-5, rtol=1e-5)
        assert (folded[1] is None) == (want.bias is None)
        if want.bias is not None:
            torch.testing.assert_close(folded[1], want.bias, atol=1e-6, rtol=1e-6)
            changed_bias += int(not torch.equal(folded[1], layer.base.bias))
    assert changed_bias >= 4


def test_merged_serving_equals_peft(setup):
    base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32)
    for name in ("lora-bias", "lora-all", "dora-bias-all"):
        hot = Engine(loaded, EngineConfig(max_batch=4, max_seq_len=96, merge_threshold=0.5, unmerge_threshold=0.01,
                                          merge_patience=1, merge_min_batch=1), store=store)
        requests = [hot.make_request(PROMPT, greedy_request(name).params, adapter=name) for _ in range(3)]
        hot.generate(requests)
        assert hot.adapters.merged_slot
        expected = peft_greedy(peft_reference(base, paths[name]))
        assert all(r.output_token_ids == expected for r in requests)


def _rewrite(src, dst, config_update=None, tensors_update=None, drop=()):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_update or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items() if k not in drop}
    tensors.update(tensors_update or {})
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_unservable_biases_are_refused(setup, tiny_checkpoints, tmp_path):
    base, store, paths = setup
    s = spec(base)
    lb, la = paths["lora-bias"], paths["lora-all"]
    key_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    with pytest.raises(AdapterError, match="lora_bias=true"):  # bias tensors the config does not announce
        load_adapter(_rewrite(lb, tmp_path / "a", {"lora_bias": False}), s, max_rank=8)
    with pytest.raises(AdapterError, match="lacks lora_B.bias"):
        load_adapter(_rewrite(lb, tmp_path / "b", drop=(key_b,)), s, max_rank=8)
    with pytest.raises(AdapterError, match="bias='none'"):
        load_adapter(_rewrite(la, tmp_path / "c", {"bias": "none"}), s, max_rank=8)
    with pytest.raises(AdapterError, match="lora_only"):  # k_proj is not targeted
        load_adapter(_rewrite(la, tmp_path / "d", {"bias": "lora_only"}), s, max_rank=8)
    with pytest.raises(AdapterError, match="model.norm.*not a decoder linear"):
        load_adapter(_rewrite(la, tmp_path / "e", tensors_update={"base_model.model.model.norm.bias":
                                                                   torch.zeros(128)}), s, max_rank=8)
    with pytest.raises(AdapterError, match="input_layernorm.*not a decoder linear"):
        load_adapter(_rewrite(la, tmp_path / "f", tensors_update={
            "base_model.model.model.layers.0.input_layernorm.bias": torch.zeros(128)}), s, max_rank=8)
    with pytest.raises(AdapterError, match="o_proj, which has no bias"):  # Qwen2's o_proj has none
        load_adapter(_rewrite(la, tmp_path / "g", tensors_update={
            "base_model.model.model.layers.0.self_attn.o_proj.base_layer.bias": torch.zeros(128)}), s, max_rank=8)
    with pytest.raises(AdapterError, match="bias='boft_only'"):
        load_adapter(_rewrite(la, tmp_path / "h", {"bias": "boft_only"}), s, max_rank=8)
    with pytest.raises(AdapterError, match="lora_bias.*DoRA"):
        load_adapter(_rewrite(paths["dora-bias-all"], tmp_path / "j", {"lora_bias": True}), s, max_rank=8)
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(_rewrite(lb, tmp_path / "i", tensors_update={key_b: torch.zeros(7)}), s, max_rank=8)
