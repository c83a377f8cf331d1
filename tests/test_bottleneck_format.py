"""AdapterHub bottleneck adapters without the library: reading, refusals (table), convert, the batched op."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from adapters.cli import main as adapterctl
from adapters.composition import Composition, Member, plan_composition
from adapters.format import AdapterError, inspect_adapter_dir, load_adapter
from adapters.store import AdapterStore
from server.model.adapter_layers import BatchMapping
from server.model.bottleneck_layers import BottleneckSlots
from tests.test_adapter_format import spec

HIDDEN, LAYERS = 128, 2
SEQ_BN = {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
          "original_ln_before": True, "original_ln_after": True, "ln_before": False, "ln_after": False,
          "init_weights": "bert", "is_parallel": False, "scaling": 1.0, "use_gating": False,
          "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
          "cross_adapter": False, "leave_out": [], "dropout": 0.0, "phm_layer": False, "stochastic_depth": 0.0}


def hub_dir(path: Path, bn: dict | None = None, width: int = 8, places=("output",), top: dict | None = None,
            tensors: dict | None = None, seed: int = 0) -> Path:
    """An adapter directory exactly as adapters 1.3.0's save_adapter(use_safetensors=True) lays it out."""
    path.mkdir(parents=True)
    config = {"config": {**SEQ_BN, **(bn or {})}, "hidden_size": HIDDEN, "model_class": "LlamaForCausalLM",
              "model_type": "llama", "name": "a", "version": "adapters.1.3.0", **(top or {})}
    (path / "adapter_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)
    if tensors is None:
        tensors = {}
        for i in range(LAYERS):
            for place in places:
                p = f"model.layers.{i}.{place}_adapters.adapters.a."
                tensors[p + "adapter_down.0.weight"] = torch.randn(width, HIDDEN, generator=gen)
                tensors[p + "adapter_down.0.bias"] = torch.randn(width, generator=gen)
                tensors[p + "adapter_up.weight"] = torch.randn(HIDDEN, width, generator=gen)
                tensors[p + "adapter_up.bias"] = torch.randn(HIDDEN, generator=gen)
    save_file(tensors, str(path / "adapter.safetensors"))
    return path


def test_reads_widths_placement_and_variant(tmp_path):
    ad = load_adapter(hub_dir(tmp_path / "a", {"reduction_factor": 3.2}, width=39), spec(), max_rank=64)
    assert (ad.kind, ad.variant, ad.rank, ad.reads, ad.activation) == ("bottleneck", "pfeiffer", 39, "sum", "relu")
    assert sorted(ad.blocks) == [(0, "out"), (1, "out")] and not ad.mergeable
    houlsby = load_adapter(hub_dir(tmp_path / "h", {"mh_adapter": True, "original_ln_before": False,
                                                    "non_linearity": "swish"}, places=("attention", "output")),
                           spec(), max_rank=64)
    assert houlsby.variant == "houlsby" and sorted(houlsby.blocks) == [(0, "attn"), (0, "out"), (1, "attn"), (1, "out")]
    par = load_adapter(hub_dir(tmp_path / "p", {"is_parallel": True, "scaling": 4.0, "reduction_factor": 2},
                               width=64), spec(), max_rank=64)
    assert (par.variant, par.scaling, par.reads) == ("parallel", 4.0, "residual")
    info = inspect_adapter_dir(tmp_path / "a")
    assert info["kind"] == "bottleneck" and info["rank"] == 39 and info["target_modules"] == ["output_adapters"]


def test_store_keeps_it_as_adapter_model_safetensors(tmp_path):
    store = AdapterStore(tmp_path / "store")
    record = store.add("bn", hub_dir(tmp_path / "a"))
    assert record.kind == "bottleneck" and (store.path("bn") / "adapter_model.safetensors").is_file()
    assert load_adapter(store.path("bn"), spec(), max_rank=16).rank == 8


@pytest.mark.parametrize("bn, top, width, message", [
    ({"ln_before": True}, None, 8, "config.ln_before=True"),
    ({"ln_after": True}, None, 8, "config.ln_after=True"),
    ({"phm_layer": True}, None, 8, "config.phm_layer=True"),
    ({"inv_adapter": "nice"}, None, 8, "config.inv_adapter='nice'"),
    ({"use_gating": True}, None, 8, "config.use_gating=True"),
    ({"scaling": "learned"}, None, 8, "config.scaling='learned'"),
    ({"residual_before_ln": "post_add"}, None, 8, "config.residual_before_ln='post_add'"),
    ({"original_ln_after": False}, None, 8, "config.original_ln_after=False"),
    ({"non_linearity": "sigmoid"}, None, 8, "config.non_linearity='sigmoid'"),
    ({"mh_adapter": False, "output_adapter": False}, None, 8, "neither config.mh_adapter"),
    ({"brand_new": 1}, None, 8, "config.brand_new=1"),
    ({"architecture": "prefix_tuning"}, None, 8, "config.architecture='prefix_tuning'"),
    ({"reduction_factor": 0}, None, 8, "config.reduction_factor must be"),
    (None, {"model_type": "gpt2"}, 8, "model_type is 'gpt2'"),
    (None, {"hidden_size": 64}, 8, "hidden_size is 64"),
    ({"reduction_factor": 3.2}, None, 40, "width int(128 // reduction_factor) = 39"),
    ({"reduction_factor": 2}, None, 64, "above this server's --max-lora-rank 32"),
])
def test_refusals_name_the_option(tmp_path, bn, top, width, message):
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_adapter(hub_dir(tmp_path / "a", bn, width=width, top=top), spec(), max_rank=32)


def test_missing_stray_and_zero_weights_are_refused(tmp_path):
    good = hub_dir(tmp_path / "good")
    from safetensors.torch import load_file

    tensors = load_file(str(good / "adapter.safetensors"))
    missing = {k: v for k, v in tensors.items() if "layers.1" not in k}
    with pytest.raises(AdapterError, match="lacks adapter_down.0.weight of the output adapter of layer 1"):
        load_adapter(hub_dir(tmp_path / "m", tensors=missing), spec(), max_rank=32)
    stray = {**tensors, "model.layers.0.attention_adapters.adapters.a.adapter_up.bias": torch.ones(HIDDEN)}
    with pytest.raises(AdapterError, match="places no adapter there"):
        load_adapter(hub_dir(tmp_path / "s", tensors=stray), spec(), max_rank=32)
    zero = {k: (torch.zeros_like(v) if "adapter_up" in k else v) for k, v in tensors.items()}
    with pytest.raises(AdapterError, match="untrained"):
        load_adapter(hub_dir(tmp_path / "z", tensors=zero), spec(), max_rank=32)
    left = {k: v for k, v in tensors.items() if "layers.0" not in k}  # leave_out [0]: layer 0 has none
    assert sorted(load_adapter(hub_dir(tmp_path / "l", {"leave_out": [0]}, tensors=left), spec(),
                               max_rank=32).blocks) == [(1, "out")]


def test_pickle_and_head_files_are_refused_with_the_fix(tmp_path):
    path = hub_dir(tmp_path / "a")
    (path / "pytorch_adapter.bin").write_bytes(b"not read")
    with pytest.raises(AdapterError, match="adapterctl convert DIR"):
        inspect_adapter_dir(path)
    (path / "pytorch_adapter.bin").unlink()
    (path / "head_config.json").write_text("{}")  # a head is checked against a loaded base's lm_head only
    with pytest.raises(AdapterError, match="with_head=False"):
        AdapterStore(tmp_path / "store").add("a", path)


def test_adapterctl_convert_writes_shared_tensors_once_per_name(tmp_path, capsys):
    src = hub_dir(tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(str(src / "adapter.safetensors"))
    (src / "adapter.safetensors").unlink()
    shared = torch.randn(4, HIDDEN)  # MAM / UniPELT tie their prefix modules across layers
    pickled = {**tensors, "prefix.a.weight": shared, "prefix.b.weight": shared}
    torch.save(pickled, src / "pytorch_adapter.bin")
    assert adapterctl(["convert", str(src), "--remove-pickle"]) == 0
    assert not (src / "pytorch_adapter.bin").exists()
    out = load_file(str(src / "adapter.safetensors"))
    assert set(out) == set(pickled) and all(torch.equal(out[k], v) for k, v in pickled.items())
    assert adapterctl(["convert", str(src)]) == 2  # nothing to convert: a usage error, said so
    assert "no pytorch_adapter.bin" in capsys.readouterr().err


def test_composition_takes_one_bottleneck_at_weight_one():
    rec = lambda kind: type("R", (), {"kind": kind, "rank": 8})()  # noqa: E731
    records = {"bn": rec("bottleneck"), "bn2": rec("bottleneck"), "lora": rec("lora")}
    configs = {"lora": {"r": 8}}
    assert plan_composition(Composition((Member("lora"), Member("bn"))), records, configs, max_rank=64) == 8
    with pytest.raises(AdapterError, match="both bottleneck"):
        plan_composition(Composition((Member("bn"), Member("bn2"))), records, configs, max_rank=64)
    with pytest.raises(AdapterError, match="weights apply to LoRA adapters only"):
        plan_composition(Composition((Member("bn", 0.5),)), records, configs, max_rank=64)


@pytest.mark.parametrize("tokens,row_kernel", [(3, True), (1, True), (1, False)],
                         ids=["padded-prefill-gather", "one-token-rows-kernel", "one-token-rows-no-kernel"])
def test_slots_give_each_row_its_own_formula(monkeypatch, tokens, row_kernel):
    """Mixed slots (widths, activations, variants) in one batch equal each row's formula alone; base rows are
    r + s bit for bit. One token per row runs the compiled row kernel (or, without it, the gather path)."""
    from server.model import cpu_ext

    if row_kernel and tokens == 1 and cpu_ext.kernel() is None:
        pytest.skip("the compiled CPU kernel cannot be built here")
    if not row_kernel:
        monkeypatch.setattr(cpu_ext, "kernel", lambda: None)
    torch.manual_seed(0)
    h = 16
    mapping = BatchMapping()
    slots = BottleneckSlots(4, 8, h, mapping, torch.float32, torch.device("cpu"))
    cases = {1: (3, "relu", 1.0, "sublayer"), 2: (8, "gelu", 4.0, "residual"), 3: (5, "tanh", 0.5, "sum")}
    weights = {}
    for s, (w, act, scale, reads) in cases.items():
        weights[s] = (torch.randn(w, h), torch.randn(w), torch.randn(h, w), torch.randn(h))
        slots.set_adapter(s, "out", *weights[s][:2], *weights[s][2:], act, scale, reads)
    rows = [0, 1, 2, 3, 2]
    mapping.slot_of_row = torch.tensor(rows)
    mapping.slots_present, mapping.uniform_slot = frozenset(rows), None
    mapping.active = mapping.any_bottleneck = True
    r, s = torch.randn(len(rows), tokens, h), torch.randn(len(rows), tokens, h)
    out = slots.add("out", r, s)
    acts = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
    for n, slot in enumerate(rows):
        if not slot:
            assert torch.equal(out[n], r[n] + s[n])
            continue
        w, act, scale, reads = cases[slot]
        down, db, up, ub = weights[slot]
        x = {"sublayer": s[n], "residual": r[n], "sum": s[n] + r[n]}[reads]
        want = r[n] + s[n] + scale * (acts[act](x @ down.T + db) @ up.T + ub)
        torch.testing.assert_close(out[n], want, atol=1e-5, rtol=1e-5)
    assert not slots.in_use("attn")
    slots.clear(2)
    assert 2 not in slots.places["out"].widths and not slots.places["out"].down[2].any()


def test_hot_bottleneck_adapter_is_never_merged(tmp_path, tiny_checkpoints):
    """Merging folds a delta into W; a bottleneck adapter has none: the merge policy never sees it, even when it
    holds every row, and its rows keep its output."""
    from server.model.loader import load_model
    from tests.test_adapters_golden import engine_for, generate, greedy_request

    store = AdapterStore(tmp_path / "store")
    bn = {"reduction_factor": 16}
    path = hub_dir(tmp_path / "a", bn, top={"hidden_size": 128})
    store.add("bn", path)
    loaded = load_model(tiny_checkpoints["llama"], dtype=torch.float32)
    plain = generate(engine_for(loaded, store, max_batch=4), [greedy_request("bn", n=6)] * 4)
    engine = engine_for(loaded, store, max_batch=4, merge_threshold=0.5, unmerge_threshold=0.25, merge_patience=1,
                        merge_min_batch=1)
    assert generate(engine, [greedy_request("bn", n=6)] * 4) == plain
    assert engine.adapters.merged_slot == 0 and engine.adapters.merge_policy.merged is None
    base = generate(engine, [greedy_request(None, n=6)])[0]
    assert plain[0] != base  # the adapter is served, not ignored
