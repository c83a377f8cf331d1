"""MAM (AdapterHub MAMConfig: prefix tuning + a bottleneck adapter): refusals without the library, and served
output against the library itself (tests/adapterhub_oracle.py; skipped with a reason where its venv is absent).

The library saves MAM only as pytorch_adapter.bin (its prefix module is shared across layers), so every MAM here
goes through ``adapterctl convert`` first, as a user's does. Its prompt's rope positions start at 0 after the
prefix's cache entries (PEFT's start at P): a mixed batch of MAM, PEFT-style and base rows checks the per-row shift.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.composition import Composition, Member, plan_composition
from adapters.format import AdapterError, inspect_adapter_dir, load_adapter
from server.model.loader import load_model
from tests.adapterhub_oracle import SKIP_REASON, oracle_python, union_oracle
from tests.test_adapter_format import spec
from tests.test_adapters_golden import engine_for, generate, greedy_request, prefill_logits
from tests.test_bottleneck_format import SEQ_BN

HIDDEN, LAYERS, P = 128, 2, 5
PREFIX = {"architecture": "prefix_tuning", "bottleneck_size": 16, "cross_prefix": True, "dropout": 0.0,
          "encoder_prefix": True, "flat": False, "init_weights_seed": None, "leave_out": [], "non_linearity": "tanh",
          "prefix_length": P, "shared_gating": True, "use_gating": False}


def mam_dir(path: Path, prefix: dict | None = None, bn: dict | None = None, kv_width: int | None = None,
            copies_differ: bool = False) -> Path:
    """A converted MAM directory laid out as adapters 1.3.0 + adapterctl convert give it (spec(): 2 layers,
    hidden 128, 2 kv heads of 32)."""
    base = spec()
    kv = kv_width or LAYERS * 2 * base.num_kv_heads * base.head_dim
    path.mkdir(parents=True)
    config = {"config": {"architecture": "union", "configs": [{**PREFIX, **(prefix or {})},
                                                              {**SEQ_BN, **(bn or {})}]},
              "hidden_size": HIDDEN, "model_class": "LlamaForCausalLM", "model_name": "", "model_type": "llama",
              "name": "m", "version": "adapters.1.3.0"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    module = {"wte.weight": torch.randn(P, HIDDEN, generator=g), "control_trans.0.weight": torch.randn(16, HIDDEN,
                                                                                                       generator=g),
              "control_trans.0.bias": torch.randn(16, generator=g), "control_trans.2.weight": torch.randn(kv, 16,
                                                                                                        generator=g),
              "control_trans.2.bias": torch.randn(kv, generator=g)}
    tensors = {f"model.prefix_tuning.prefix_tunings.m.self_prefix.{k}": v for k, v in module.items()}
    for i in range(LAYERS):
        for k, v in module.items():
            tensors[f"model.layers.{i}.self_attn.prefix_tuning.pool.prefix_tunings.m.self_prefix.{k}"] = (
                v + 1 if copies_differ and i == 1 else v.clone())
        p = f"model.layers.{i}.output_adapters.adapters.m."
        tensors[p + "adapter_down.0.weight"] = torch.randn(8, HIDDEN, generator=g)
        tensors[p + "adapter_down.0.bias"] = torch.randn(8, generator=g)
        tensors[p + "adapter_up.weight"] = torch.randn(HIDDEN, 8, generator=g)
        tensors[p + "adapter_up.bias"] = torch.randn(HIDDEN, generator=g)
    save_file(tensors, str(path / "adapter.safetensors"))
    return path


def test_reads_prefix_kv_and_bottleneck(tmp_path):
    path = mam_dir(tmp_path / "m")
    info = inspect_adapter_dir(path)
    assert (info["kind"], info["num_virtual_tokens"], info["rank"]) == ("mam", P, 8)
    adapter = load_adapter(path, spec(), max_rank=16)
    base = spec()
    assert adapter.prefix.shape == (LAYERS, 2, base.num_kv_heads, P, base.head_dim)
    assert adapter.bottleneck.variant == "pfeiffer" and not adapter.mergeable
    assert not type(adapter).prefix_shifts_positions


@pytest.mark.parametrize("prefix,bn,kv_width,copies_differ,message", [
    ({"use_gating": True}, None, None, False, "use_gating=true"),
    ({"leave_out": [1]}, None, None, False, "leave_out=[1]"),
    ({"prefix_length": 0}, None, None, False, "prefix_length must be a positive integer"),
    ({"non_linearity": "softmax"}, None, None, False, "non_linearity='softmax'"),
    ({"architecture": "lora"}, None, None, False, "only MAM"),
    (None, {"ln_before": True}, None, False, "ln_before"),
    (None, None, 2 * 2 * 8 * 32, False, "the prefix was made for another base"),
    (None, None, None, True, "differs from the model-level prefix"),
])
def test_refusals_name_the_option(tmp_path, prefix, bn, kv_width, copies_differ, message):
    path = mam_dir(tmp_path / "m", prefix, bn, kv_width, copies_differ)
    with pytest.raises(AdapterError, match=re.escape(message)):
        load_adapter(path, spec(), max_rank=16)


def test_mam_is_not_composed():
    records = {"m": type("R", (), {"kind": "mam", "rank": 8})(), "l": type("R", (), {"kind": "lora", "rank": 8})()}
    with pytest.raises(AdapterError, match="kind 'mam', which cannot be composed"):
        plan_composition(Composition((Member("l"), Member("m"))), records, {"l": {}, "m": {}}, max_rank=64)


# ---- against the library ----

PROMPTS = [[5, 72, 101, 108, 108, 111, 32, 119, 111, 114], [5, 33, 60, 99, 7, 41]]
NEW_TOKENS = 8
ADAPTERS = [  # (name, library config, kwargs)
    ("mam", "mam", {}),  # MAMConfig(): prefix 30 (bottleneck 800, tanh) + par_bn (relu, rf 2, scaling 4)
    ("mam-flat-houlsby", "mam", {"prefix_tuning": {"flat": True, "prefix_length": 7},
                                 "adapter": {"config": "double_seq_bn", "kwargs": {"non_linearity": "gelu"}}}),
    ("houlsby", "double_seq_bn", {}),  # a bottleneck alone, to mix with
]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    if oracle_python() is None:
        pytest.skip(SKIP_REASON)
    return union_oracle(tmp_path_factory.mktemp("adapterhub-mam"), ADAPTERS, "mam", PROMPTS, NEW_TOKENS)




def test_mam_matches_the_library_fp32(oracle):
    base, store, reference = oracle
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    for name, config, _ in ADAPTERS:
        for prompt, want, plain in zip(PROMPTS, reference[name], reference["base"]):
            ours = prefill_logits(engine, name, prompt)
            torch.testing.assert_close(ours, torch.tensor(want["logits"]), atol=1e-4, rtol=0, msg=name)
            assert (ours - torch.tensor(plain["logits"])).abs().max() > 0.05, f"{name} must visibly change the output"
        got = generate(engine, [greedy_request(name, p, NEW_TOKENS) for p in PROMPTS])
        assert got == [r["tokens"] for r in reference[name]], name


def test_mixed_batch_with_mam_equals_solo(oracle):
    """MAM rows (rope shifted by their prefix), a plain bottleneck and base rows in one batch equal each alone."""
    base, store, reference = oracle
    loaded = load_model(base, dtype=torch.float32)
    names = [None, "mam", "houlsby", "mam-flat-houlsby", "mam", None]
    prompts = [PROMPTS[i % 2][: 4 + i] for i in range(len(names))]
    alone = engine_for(loaded, store, max_batch=1)
    solo = [generate(alone, [greedy_request(n, p, NEW_TOKENS)])[0] for n, p in zip(names, prompts)]
    mixed = generate(engine_for(loaded, store, max_adapter_slots=4), [greedy_request(n, p, NEW_TOKENS)
                                                                      for n, p in zip(names, prompts)])
    assert mixed == solo
    assert len({tuple(t) for t in solo}) > 3
