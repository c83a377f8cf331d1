"""adapters.format against PEFT itself: adapters are made with PEFT on tiny models from configs."""
from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from adapters.format import AdapterError, BaseSpec, inspect_adapter_dir, load_adapter

TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=300)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(**kw):
    return LlamaConfig(**{**TINY, **kw})


def qwen_config(**kw):
    return Qwen2Config(**{**TINY, **kw})


def make_base(arch: str = "llama", **kw):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(llama_config(**kw)).eval()
    return Qwen2ForCausalLM(qwen_config(**kw)).eval()


def spec(arch: str = "llama", name: str = "tiny", **kw) -> BaseSpec:
    cfg = llama_config(**kw) if arch == "llama" else qwen_config(**kw)
    return BaseSpec.from_hf_config(cfg, name)


def save_peft(tmp_path: Path, peft_config, arch: str = "llama", name: str = "ad", seed: int = 1, **save_kw):
    model = get_peft_model(make_base(arch), peft_config)
    torch.manual_seed(seed)
    out = tmp_path / name
    model.save_pretrained(out, **save_kw)
    return model, out


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def edit_weights(path: Path, fn) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    tensors = fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def lora_cfg(**kw):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL, "init_lora_weights": False, **kw})


def peft_lora_layers(model):
    """(layer, module) -> the PEFT lora.Linear of that module."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            parts = name.split(".")
            out[(int(parts[parts.index("layers") + 1]), parts[-1])] = module
    return out


# ------------------------------------------------------------------------------------------ LoRA


def test_base_spec_from_config():
    s = spec("llama")
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim) == (2, 128, 4, 2, 32)
    assert s.module_shapes["q_proj"] == (128, 128)
    assert s.module_shapes["k_proj"] == (128, 64)
    assert s.module_shapes["down_proj"] == (256, 128)
    assert BaseSpec.from_hf_config(llama_config(head_dim=16), "x").module_shapes["q_proj"] == (128, 64)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_tensors_and_scaling_equal_peft(tmp_path, arch):
    model, path = save_peft(tmp_path, lora_cfg(), arch=arch)
    ad = load_adapter(path, spec(arch), max_rank=16, name="mine")
    assert ad.kind == "lora" and ad.name == "mine" and ad.rank == 4
    assert ad.target_modules == tuple(sorted(ALL))
    layers = peft_lora_layers(model)
    assert set(ad.lora) == set(layers) and len(layers) == 14
    for key, layer in layers.items():
        w = ad.lora[key]
        assert torch.equal(w.a, layer.lora_A["default"].weight)
        assert torch.equal(w.b, layer.lora_B["default"].weight)
        assert w.scaling == pytest.approx(layer.scaling["default"]) == 2.0
    assert ad.nbytes == sum(w.a.nbytes + w.b.nbytes for w in ad.lora.values())
    # the semantics the engine relies on: y = base(x) + scaling * (x A^T) B^T
    layer = layers[(1, "v_proj")]
    x = torch.randn(3, 128)
    with torch.no_grad():
        want = layer(x)
        w = ad.lora[(1, "v_proj")]
        got = layer.base_layer(x) + w.scaling * (x @ w.a.T) @ w.b.T
    torch.testing.assert_close(got, want)


def test_lora_rslora_rank_and_alpha_pattern_equal_peft(tmp_path):
    cfg = lora_cfg(use_rslora=True, rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                   alpha_pattern={"v_proj": 32, r"layers\.0\.mlp\.up_proj": 3})
    model, path = save_peft(tmp_path, cfg, arch="qwen2")
    ad = load_adapter(path, spec("qwen2"), max_rank=8)
    assert ad.rank == 8
    for (i, m), layer in peft_lora_layers(model).items():
        w = ad.lora[(i, m)]
        assert w.a.shape[0] == layer.r["default"]
        assert w.scaling == pytest.approx(layer.scaling["default"])
        assert torch.equal(w.b, layer.lora_B["default"].weight)
    assert ad.lora[(0, "q_proj")].rank == 8 and ad.lora[(1, "down_proj")].rank == 2
    assert ad.lora[(0, "down_proj")].rank == 4
    assert ad.lora[(1, "v_proj")].scaling == pytest.approx(32 / math.sqrt(4))
    assert ad.lora[(0, "up_proj")].scaling == pytest.approx(3 / math.sqrt(4))
    assert ad.lora[(1, "up_proj")].scaling == pytest.approx(8 / math.sqrt(4))
    with pytest.raises(AdapterError, match=r"rank 8 .*max_rank 4"):
        load_adapter(path, spec("qwen2"), max_rank=4)


@pytest.mark.parametrize("targets, extra, expected", [
    ("all-linear", {}, {(i, m) for i in range(2) for m in ALL}),
    (r".*\.layers\.1\.self_attn\.(q_proj|v_proj)", {}, {(1, "q_proj"), (1, "v_proj")}),
    (["k_proj", "down_proj"], dict(layers_to_transform=[1]), {(1, "k_proj"), (1, "down_proj")}),
    (["k_proj"], dict(layers_to_transform=0, layers_pattern="layers"), {(0, "k_proj")}),
    (["q_proj", "up_proj"], dict(exclude_modules=["model.layers.0.mlp.up_proj"]),
     {(0, "q_proj"), (1, "q_proj"), (1, "up_proj")}),
    ("all-linear", dict(exclude_modules=r".*mlp.*"), {(i, m) for i in range(2) for m in ALL[:4]}),
])
def test_lora_target_resolution_equals_peft(tmp_path, targets, extra, expected):
    model, path = save_peft(tmp_path, lora_cfg(target_modules=targets, **extra))
    assert set(peft_lora_layers(model)) == expected
    ad = load_adapter(path, spec(), max_rank=8)
    assert set(ad.lora) == expected
    # the raw config string form must resolve the same way
    edit_config(path, target_modules=targets)
    assert set(load_adapter(path, spec(), max_rank=8).lora) == expected


def test_lora_adapter_name_infix_and_prefix_variants(tmp_path):
    model, path = save_peft(tmp_path, lora_cfg(target_modules=["q_proj"]))
    want = load_adapter(path, spec(), max_rank=8)
    edit_weights(path, lambda t: {k.replace(".weight", ".default.weight").replace("base_model.model.", ""): v
                                  for k, v in t.items()})
    assert any(".lora_A.default.weight" in k for k in load_file(path / "adapter_model.safetensors"))
    got = load_adapter(path, spec(), max_rank=8)
    for key in want.lora:
        assert torch.equal(got.lora[key].a, want.lora[key].a) and torch.equal(got.lora[key].b, want.lora[key].b)


def test_lora_dtype(tmp_path):
    _, path = save_peft(tmp_path, lora_cfg(target_modules=["q_proj"]))
    ad = load_adapter(path, spec(), max_rank=8, dtype=torch.bfloat16)
    assert all(w.a.dtype == torch.bfloat16 and w.b.dtype == torch.bfloat16 for w in ad.lora.values())


def test_inspect_adapter_dir(tmp_path):
    _, path = save_peft(tmp_path, lora_cfg(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 6}))
    info = inspect_adapter_dir(path)
    assert info == {"kind": "lora", "peft_type": "LORA", "rank": 6, "target_modules": ["q_proj", "v_proj"],
                    "base_model": None, "num_virtual_tokens": 0}
    edit_config(path, use_dora="yes")
    with pytest.raises(AdapterError, match="use_dora"):
        inspect_adapter_dir(path)


# ------------------------------------------------------------------------------------------ LoRA refusals


def test_pickle_weights_refused_and_never_unpickled(tmp_path, monkeypatch):
    _, path = save_peft(tmp_path, lora_cfg(target_modules=["q_proj"]), safe_serialization=False)
    assert (path / "adapter_model.bin").exists() and not (path / "adapter_model.safetensors").exists()

    def boom(*a, **k):
        raise AssertionError("unpickled!")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    for fn in (lambda: load_adapter(path, spec(), max_rank=8), lambda: inspect_adapter_dir(path)):
        with pytest.raises(AdapterError, match=r"adapter_model\.bin.*pickle.*safe_serialization=True"):
            fn()
    # a pickle next to the safetensors named like the weights is refused too
    for suffix in (".pt", ".pth", ".ckpt"):
        d = tmp_path / f"both{suffix}"
        _, good = save_peft(tmp_path, lora_cfg(target_modules=["q_proj"]), name=f"good{suffix}")
        shutil.copytree(good, d)
        (d / f"adapter_model{suffix}").write_bytes(b"\x80\x04not really")
        with pytest.raises(AdapterError, match=rf"adapter_model\{suffix}"):
            load_adapter(d, spec(), max_rank=8)


def test_missing_files(tmp_path):
    _, path = save_peft(tmp_path, lora_cfg(target_modules=["q_proj"]))
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load_adapter(path, spec(), max_rank=8)
    (path / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_adapter(path, spec(), max_rank=8)
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope", spec(), max_rank=8)


def test_corrupt_files(tmp_path):
    _, path = save_peft(tmp_path, lora_cfg(target_modules=["q_proj"]))
    (path / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(AdapterError, match="not a valid safetensors"):
        load_adapter(path, spec(), max_rank=8)
    (path / "adapter_config.json").write_text("{nope")
    with pytest.raises(AdapterError, match="adapter_config.json is not readable JSON"):
        load_adapter(path, spec(), max_rank=8)


@pytest.mark.parametrize("peft_kw, match", [
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    # bias="lora_only"/"all" and lora_bias=True are served now (tests/test_bias_golden.py)
    (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
])
def test_lora_config_refusals_from_peft(tmp_path, peft_kw, match):
    _, path = save_peft(tmp_path, lora_cfg(**peft_kw))
    with pytest.raises(AdapterError, match=match):
        load_adapter(path, spec(), max_rank=8)


@pytest.mark.parametrize("changes, match", [
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(megatron_config={"tensor_model_parallel_size": 2}), "megatron_config"),
    (dict(target_modules=["q_proj", "input_layernorm"]), "input_layernorm.*not a linear layer"),
    (dict(target_modules=["q_proj", "c_attn"]), "target module 'c_attn'.*does not exist"),
    (dict(target_modules=".*"), "not a linear layer"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(peft_type="LOHA"), "peft_type LOHA is not served"),
    (dict(task_type="SEQ_CLS"), "task_type 'SEQ_CLS'"),
    (dict(some_future_option={"x": 1}), "some_future_option"),
    (dict(base_model_name_or_path="meta-llama/Llama-2-7b-hf"), "base_model_name_or_path"),
    (dict(r=0), "field r"),
])
def test_lora_config_refusals_edited(tmp_path, changes, match):
    _, path = save_peft(tmp_path, lora_cfg(target_modules=["q_proj"]))
    edit_config(path, **changes)
    with pytest.raises(AdapterError, match=match):
        load_adapter(path, spec(), max_rank=8)


def test_base_name_compared_leniently(tmp_path):
    _, path = save_peft(tmp_path, lora_cfg(target_modules=["q_proj"]))
    edit_config(path, base_model_name_or_path="org/tiny")
    load_adapter(path, spec(name="/models/tiny/"), max_rank=8)
    load_adapter(path, spec(name=""), max_rank=8)
    edit_config(path, base_model_name_or_path=None)
    load_adapter(path, spec(name="anything"), max_rank=8)


def test_lora_weight_refusals(tmp_path):
    _, path = save_peft(tmp_path, lora_cfg(target_modules=["q_proj"]))
    good = load_file(path / "adapter_model.safetensors")
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert a_key in good

    def write(tensors):
        save_file(tensors, path / "adapter_model.safetensors")

    write({**good, "base_model.model.model.layers.0.self_attn.foo_proj.lora_A.weight": torch.ones(4, 128)})
    with pytest.raises(AdapterError, match="foo_proj.*does not have"):
        load_adapter(path, spec(), max_rank=8)
    write({**good, "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.ones(4, 128)})
    with pytest.raises(AdapterError, match="layers.7.*does not have"):
        load_adapter(path, spec(), max_rank=8)
    write({**good, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(4, 128)})
    with pytest.raises(AdapterError, match="target_modules.*does not select"):
        load_adapter(path, spec(), max_rank=8)
    write({**good, "base_model.model.lm_head.lora_A.weight": torch.ones(4, 128)})
    with pytest.raises(AdapterError, match="unexpected tensor 'base_model.model.lm_head"):
        load_adapter(path, spec(), max_rank=8)
    write({**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(128)})
    with pytest.raises(AdapterError, match="lora_magnitude_vector"):
        load_adapter(path, spec(), max_rank=8)
    write({k: v for k, v in good.items() if k != a_key})
    with pytest.raises(AdapterError, match="lacks lora_A for model.layers.0.self_attn.q_proj"):
        load_adapter(path, spec(), max_rank=8)
    for bad in (float("nan"), float("inf"), float("-inf")):  # one element among finite ones, and a whole tensor
        one = good[a_key].clone()
        one[2, 77] = bad
        for tensor in (one, torch.full((4, 128), bad)):
            write({**good, a_key: tensor})
            with pytest.raises(AdapterError, match="NaN or Inf"):
                load_adapter(path, spec(), max_rank=8)
    write(good)
    # shapes that do not fit: a base with another hidden size
    with pytest.raises(AdapterError, match=r"shape \[4, 128\], expected \[4, 64\]"):
        load_adapter(path, spec(hidden_size=64, intermediate_size=128), max_rank=8)
    # config rank disagrees with the weights
    edit_config(path, r=2)
    with pytest.raises(AdapterError, match="expected"):
        load_adapter(path, spec(), max_rank=8)


def test_init_only_lora_refused(tmp_path):
    _, path = save_peft(tmp_path, lora_cfg(init_lora_weights=True))  # PEFT default: B = 0
    with pytest.raises(AdapterError, match="all zeros.*change nothing"):
        load_adapter(path, spec(), max_rank=8)


# ------------------------------------------------------------------------------------------ IA3


def randomize_ia3(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand_like(p) + 0.5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ia3_equals_peft(tmp_path, arch):
    cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = get_peft_model(make_base(arch), cfg)
    randomize_ia3(model)
    model.save_pretrained(tmp_path / "ia3")
    ad = load_adapter(tmp_path / "ia3", spec(arch), max_rank=8)
    assert ad.kind == "ia3" and ad.rank == 0 and ad.layer_state == {"ia3"} and ad.prefix_kv() is None
    assert ad.ia3_feedforward == frozenset({"down_proj"})
    assert ad.target_modules == ("down_proj", "k_proj", "v_proj")
    n = 0
    for name, module in model.named_modules():
        if hasattr(module, "ia3_l") and "default" in getattr(module, "ia3_l", {}):
            parts = name.split(".")
            key = (int(parts[parts.index("layers") + 1]), parts[-1])
            vec = ad.ia3[key]
            assert torch.equal(vec, module.ia3_l["default"].flatten())
            fan_in, fan_out = spec(arch).module_shapes[key[1]]
            assert vec.shape == ((fan_in,) if key[1] == "down_proj" else (fan_out,))
            x = torch.randn(3, fan_in)
            with torch.no_grad():
                want = module(x)
                got = module.base_layer(x * vec) if key[1] in ad.ia3_feedforward else module.base_layer(x) * vec
            torch.testing.assert_close(got, want)
            n += 1
    assert n == len(ad.ia3) == 6


def test_ia3_refusals(tmp_path):
    cfg = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    _, path = save_peft(tmp_path, cfg)  # default init: all ones
    with pytest.raises(AdapterError, match="all ones.*change nothing"):
        load_adapter(path, spec(), max_rank=8)
    edit_weights(path, lambda t: {k: v * 2 for k, v in t.items()})
    load_adapter(path, spec(), max_rank=8)
    edit_config(path, feedforward_modules=["down_proj", "up_proj"])
    with pytest.raises(AdapterError, match="feedforward_modules.*subset of target_modules"):
        load_adapter(path, spec(), max_rank=8)
    edit_config(path, feedforward_modules=[])  # down_proj [1, in] no longer fits an output scale
    with pytest.raises(AdapterError, match=r"down_proj.ia3_l' .*has shape \[1, 256\], expected \[128, 1\]"):
        load_adapter(path, spec(), max_rank=8)
    edit_config(path, feedforward_modules=["down_proj"], modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="modules_to_save"):
        load_adapter(path, spec(), max_rank=8)


# ------------------------------------------------------------------------------------------ prefix


@pytest.mark.parametrize("arch, projection", [("llama", False), ("qwen2", False), ("llama", True)])
def test_prefix_layout_equals_peft_get_prompt(tmp_path, arch, projection):
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection,
                             encoder_hidden_size=32)
    _, path = save_peft(tmp_path, cfg, arch=arch)
    s = spec(arch)
    ad = load_adapter(path, s, max_rank=8)
    assert ad.kind == "prefix" and ad.num_virtual_tokens == 5 and not ad.layer_state and not ad.mergeable
    assert ad.prefix.shape == (s.num_layers, 2, s.num_kv_heads, 5, s.head_dim) == (2, 2, 2, 5, 32)
    assert ad.nbytes == ad.prefix.nbytes
    # what PEFT itself writes into the KV cache when it serves the saved adapter
    peft_model = PeftModel.from_pretrained(make_base(arch), path)
    cache = peft_model.get_prompt(batch_size=1)
    assert len(cache.layers) == s.num_layers
    for i, layer in enumerate(cache.layers):
        assert torch.equal(ad.prefix[i, 0], layer.keys[0])
        assert torch.equal(ad.prefix[i, 1], layer.values[0])
    info = inspect_adapter_dir(path)
    assert info["kind"] == "prefix" and info["num_virtual_tokens"] == 5 and info["rank"] == 0


def test_prefix_refusals(tmp_path):
    _, path = save_peft(tmp_path, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(AdapterError, match="num_attention_heads is 2 but this base needs 4"):
        load_adapter(path, spec(num_key_value_heads=4), max_rank=8)
    with pytest.raises(AdapterError, match="num_layers is 2 but this base needs 3"):
        load_adapter(path, spec(num_hidden_layers=3), max_rank=8)
    edit_config(path, num_transformer_submodules=2)
    with pytest.raises(AdapterError, match="num_transformer_submodules"):
        load_adapter(path, spec(), max_rank=8)
    edit_config(path, num_transformer_submodules=1, num_virtual_tokens=4)
    with pytest.raises(AdapterError, match=r"prompt_embeddings' .*has shape \[3, 256\], expected \[4, 256\]"):
        load_adapter(path, spec(), max_rank=8)
    edit_config(path, num_virtual_tokens=3)
    edit_weights(path, lambda t: {**t, "extra": torch.zeros(1)})
    with pytest.raises(AdapterError, match="unexpected tensor 'extra'"):
        load_adapter(path, spec(), max_rank=8)


def test_prompt_tuning_read_and_refusals(tmp_path):
    _, path = save_peft(tmp_path, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ad = load_adapter(path, spec(), max_rank=8)
    assert ad.kind == "prompt" and ad.num_virtual_tokens == 3 and ad.soft_prompt().shape == (3, spec().hidden_size)
    assert inspect_adapter_dir(path)["num_virtual_tokens"] == 3
    with pytest.raises(AdapterError, match="token_dim is 128 but this base needs 64"):
        load_adapter(path, spec(hidden_size=64, intermediate_size=128), max_rank=8)
    edit_config(path, num_virtual_tokens=4)
    with pytest.raises(AdapterError, match=r"has shape \[3, 128\], expected \[4, 128\]"):
        load_adapter(path, spec(), max_rank=8)
    edit_config(path, num_virtual_tokens=3, peft_type="P_TUNING")
    assert load_adapter(path, spec(), max_rank=8).kind == "prompt"


def test_other_prompt_learning_refused(tmp_path):
    _, path = save_peft(tmp_path, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    edit_config(path, peft_type="MULTITASK_PROMPT_TUNING")
    with pytest.raises(AdapterError, match="peft_type MULTITASK_PROMPT_TUNING is not served.*PREFIX_TUNING"):
        load_adapter(path, spec(), max_rank=8)
    edit_config(path, peft_type="ADAPTION_PROMPT")
    with pytest.raises(AdapterError, match="peft_type ADAPTION_PROMPT"):
        inspect_adapter_dir(path)
    (path / "adapter_config.json").write_text("{nope")
    with pytest.raises(AdapterError, match="adapter_config.json is not readable JSON"):
        load_adapter(path, spec(), max_rank=8)
