"""DoRA (use_dora) served against PEFT: fp32 logits and greedy tokens, an NF4 base, DoRA rows mixed with every
other kind in one batch, and merge-on-demand (DoRA folds exactly: W' = m/||W + sBA|| (W + sBA), bias unchanged)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.format import BaseSpec, DoraAdapter, load_adapter
from adapters.store import AdapterStore
from server.model.loader import load_model
from tests.peft_adapters import make_dora, make_ia3, make_lora, make_prefix
from tests.test_adapters_golden import (PROMPT, assert_matches_peft_over_nf4, engine_for, generate, greedy_request, peft_greedy, peft_reference,
                                        prefill_logits)


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v have a bias, which DoRA does not scale
def setup(request, tiny_checkpoints, tmp_path_factory):
    arch = request.param
    base = tiny_checkpoints[arch]
    root = tmp_path_factory.mktemp(f"dora-{arch}")
    paths = {
        "dora": make_dora(base, root / "dora", seed=21),
        "dora-rslora": make_dora(base, root / "dora2", seed=22, r=4, targets=("k_proj", "gate_proj"), use_rslora=True,
                                 rank_pattern={"gate_proj": 6}),
        "lora": make_lora(base, root / "lora", seed=23),
        "ia3": make_ia3(base, root / "ia3", seed=24),
        "prefix": make_prefix(base, root / "prefix", seed=25),
    }
    store = AdapterStore(root / "store")
    for name, path in paths.items():
        store.add(name, path)
    return arch, base, store, paths


def test_dora_is_read_with_its_magnitudes(setup):
    arch, base, store, paths = setup
    assert store.get("dora").kind == "dora" and store.get("dora").rank == 8
    from transformers import AutoConfig
    ad = load_adapter(paths["dora"], BaseSpec.from_hf_config(AutoConfig.from_pretrained(base), base.name), max_rank=8)
    assert isinstance(ad, DoraAdapter) and ad.mergeable and set(ad.magnitude) == set(ad.lora)
    assert ad.target_modules == ("down_proj", "o_proj", "q_proj", "up_proj", "v_proj")


@pytest.mark.parametrize("name", ["dora", "dora-rslora"])
def test_dora_matches_peft_fp32(setup, name):
    arch, base, store, paths = setup
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    reference = peft_reference(base, paths[name])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    ours = prefill_logits(engine, name)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert (ours - prefill_logits(engine, None)).abs().max() > 0.05, "the adapter must visibly change the output"
    assert generate(engine, [greedy_request(name)])[0] == peft_greedy(reference)


def test_dora_magnitude_is_not_ignored(setup, tmp_path):
    """The same factors served as a plain LoRA (use_dora false, magnitudes dropped) give other logits."""
    arch, base, store, paths = setup
    as_lora = tmp_path / "as-lora"
    as_lora.mkdir()
    config = json.loads((paths["dora"] / "adapter_config.json").read_text())
    (as_lora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    tensors = load_file(str(paths["dora"] / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(as_lora / "adapter_model.safetensors"))
    store.add("dora-as-lora", as_lora, overwrite=True)
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    assert (prefill_logits(engine, "dora") - prefill_logits(engine, "dora-as-lora")).abs().max() > 0.05


def test_mixed_batch_with_dora_gives_each_row_its_solo_output(setup):
    arch, base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32)
    names = [None, "dora", "lora", "ia3", "prefix", "dora-rslora", None, "dora"]
    prompts = [PROMPT[: 5 + i] for i in range(len(names))]
    solo = [generate(engine_for(loaded, store, max_batch=1, max_adapter_slots=6), [greedy_request(n, p)])[0]
            for n, p in zip(names, prompts)]
    mixed = generate(engine_for(loaded, store, max_adapter_slots=6), [greedy_request(n, p) for n, p in
                                                                     zip(names, prompts)])
    assert mixed == solo
    assert len({tuple(t) for t in solo}) > 3


def test_dora_over_nf4_matches_peft_over_bitsandbytes(setup):
    arch, base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32, quantization="nf4")
    names = [None, "dora", "lora", "dora-rslora"]
    solo = [generate(engine_for(loaded, store, max_batch=1), [greedy_request(n)])[0] for n in names]
    engine = engine_for(loaded, store)  # built last: the newest engine on a model owns its adapter slots
    assert generate(engine, [greedy_request(n) for n in names]) == solo
    for name in ("dora", "dora-rslora"):
        reference = peft_reference(base, paths[name], quantized=True)
        assert_matches_peft_over_nf4(prefill_logits(engine, name), reference, base, paths[name], name)
        assert generate(engine, [greedy_request(name)])[0] == peft_greedy(reference)


def test_dora_folds_like_peft_merge(setup):
    """AdapterLinear.folded of a DoRA slot equals the weights of PEFT's merge_and_unload (biases untouched)."""
    arch, base, store, paths = setup
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    request = engine.make_request(PROMPT, greedy_request("dora").params, adapter="dora")
    prefill_logits(engine, "dora")  # loads the adapter into a slot
    slot = engine.adapters.table.lookup(request.adapter_version)
    merged = peft_reference(base, paths["dora"]).merge_and_unload()
    checked = 0
    for (i, module), layer in engine.adapters.layers.items():
        folded = layer.folded(slot)
        parent = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        want = getattr(getattr(merged.model.layers[i], parent), module)
        if folded is None:
            continue
        torch.testing.assert_close(folded[0], want.weight, atol=1e-5, rtol=1e-5)
        if want.bias is not None:
            torch.testing.assert_close(folded[1], want.bias, atol=0, rtol=0)
        checked += 1
    assert checked == 5 * engine.runner.model.args.num_layers
