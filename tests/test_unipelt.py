"""UniPELT (AdapterHub UniPELTConfig: gated prefix + gated bottleneck + gated LoRA): refusals without the library,
and served output against the library's own modules with the server's per-token gate (scripts/adapterhub_oracle.py
``per_token_gates``; skipped with a reason where its venv is absent).

The served gate is each token's own sigmoid(gate(x_t)) where the library averages it over the sequence
(adapters.kinds.unipelt says why). The golden test holds us to the library's modules under that semantics (fp32,
1e-4, greedy identical) and prints how far that lands from the library's unmodified full recomputation.
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
from server.model.adapter_ops import token_gate
from server.model.loader import load_model
from tests.adapterhub_oracle import SKIP_REASON, oracle_python, union_oracle
from tests.peft_adapters import make_lora
from tests.test_adapter_format import spec
from tests.test_adapters_golden import engine_for, generate, greedy_request, prefill_logits
from tests.test_bottleneck_format import SEQ_BN
from tests.test_mam import PREFIX

HIDDEN, LAYERS, P, R = 128, 2, 5, 4
LORA = {"alpha": 2, "architecture": "lora", "attn_matrices": ["q", "v"], "composition_mode": "add", "dropout": 0.0,
        "dtype": None, "init_weights": "lora", "init_weights_seed": None, "intermediate_lora": False, "leave_out": [],
        "output_lora": False, "r": R, "selfattn_lora": True, "use_dora": False, "use_gating": True, "vera_b": None,
        "vera_d": None}


def unipelt_dir(path: Path, prefix: dict | None = None, bn: dict | None = None, lora: dict | None = None,
                extra: dict | None = None, drop: str | None = None) -> Path:
    """A converted UniPELT directory laid out as adapters 1.3.0 + adapterctl convert give it (spec(): 2 layers,
    hidden 128, 4 heads / 2 kv heads of 32)."""
    base = spec()
    path.mkdir(parents=True)
    configs = [{**PREFIX, "use_gating": True, **(prefix or {})}, {**SEQ_BN, "use_gating": True, **(bn or {})},
               {**LORA, **(lora or {})}]
    config = {"config": {"architecture": "union", "configs": configs}, "hidden_size": HIDDEN,
              "model_class": "LlamaForCausalLM", "model_name": "", "model_type": "llama", "name": "u",
              "version": "adapters.1.3.0"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    kv = LAYERS * 2 * base.num_kv_heads * base.head_dim
    module = {"wte.weight": torch.randn(P, HIDDEN, generator=g), "control_trans.0.weight": torch.randn(16, HIDDEN,
                                                                                                       generator=g),
              "control_trans.0.bias": torch.randn(16, generator=g), "control_trans.2.weight": torch.randn(kv, 16,
                                                                                                        generator=g),
              "control_trans.2.bias": torch.randn(kv, generator=g)}
    tensors = {f"model.prefix_tuning.prefix_tunings.u.self_prefix.{k}": v for k, v in module.items()}
    outputs = {"q_proj": base.num_heads * base.head_dim, "v_proj": base.num_kv_heads * base.head_dim}
    for i in range(LAYERS):
        for k, v in module.items():
            tensors[f"model.layers.{i}.self_attn.prefix_tuning.pool.prefix_tunings.u.self_prefix.{k}"] = v.clone()
        tensors[f"model.layers.{i}.self_attn.prefix_tuning.prefix_gates.u.weight"] = torch.randn(1, HIDDEN, generator=g)
        tensors[f"model.layers.{i}.self_attn.prefix_tuning.prefix_gates.u.bias"] = torch.randn(1, generator=g)
        p = f"model.layers.{i}.output_adapters.adapters.u."
        for name, shape in (("adapter_down.0.weight", (8, HIDDEN)), ("adapter_down.0.bias", (8,)),
                            ("adapter_up.weight", (HIDDEN, 8)), ("adapter_up.bias", (HIDDEN,)),
                            ("gate.weight", (1, HIDDEN)), ("gate.bias", (1,))):
            tensors[p + name] = torch.randn(*shape, generator=g)
        for module_name, out in outputs.items():
            p = f"model.layers.{i}.self_attn.{module_name}.loras.u."
            tensors[p + "lora_A"] = torch.randn(R, HIDDEN, generator=g)
            tensors[p + "lora_B"] = torch.randn(out, R, generator=g)
            tensors[p + "gate.weight"] = torch.randn(1, HIDDEN, generator=g)
            tensors[p + "gate.bias"] = torch.randn(1, generator=g)
    tensors.update(extra or {})
    tensors.pop(drop, None)
    save_file(tensors, str(path / "adapter.safetensors"))
    return path


def test_reads_every_gated_part(tmp_path):
    path = unipelt_dir(tmp_path / "u")
    info = inspect_adapter_dir(path)
    assert (info["kind"], info["num_virtual_tokens"], info["rank"]) == ("unipelt", P, 8)
    adapter = load_adapter(path, spec(), max_rank=16)
    assert adapter.prefix.shape == (LAYERS, 2, 2, P, 32) and len(adapter.prefix_gates) == LAYERS
    assert set(adapter.lora) == {(i, m) for i in range(LAYERS) for m in ("q_proj", "v_proj")}
    assert set(adapter.bottleneck_gates) == {(i, "out") for i in range(LAYERS)}
    assert not adapter.mergeable and not type(adapter).prefix_shifts_positions


@pytest.mark.parametrize("prefix,bn,lora,extra,drop,message", [
    (None, None, {"use_gating": False}, None, None, "use_gating=False on its lora part"),
    ({"use_gating": False}, None, None, None, None, "use_gating=False on its prefix_tuning part"),
    (None, None, {"intermediate_lora": True}, None, None, "intermediate_lora=True"),
    (None, None, {"output_lora": True}, None, None, "output_lora=True"),
    (None, None, {"attn_matrices": ["q", "o"]}, None, None, "attn_matrices=['q', 'o']"),
    (None, None, {"use_dora": True}, None, None, "use_dora=True"),
    (None, None, {"composition_mode": "scale"}, None, None, "composition_mode='scale'"),
    (None, None, {"r": 32}, None, None, "exceeds this server's max_rank 16"),
    (None, {"ln_before": True}, None, None, None, "ln_before"),
    ({"leave_out": [0]}, None, None, None, None, "leave_out=[0]"),
    (None, None, None, None, "model.layers.1.self_attn.v_proj.loras.u.gate.bias", "lacks"),
    (None, None, None, None, "model.layers.0.output_adapters.adapters.u.gate.weight", "lacks"),
    (None, None, None, {"model.layers.0.attention_adapters.adapters.u.gate.weight": torch.ones(1, HIDDEN)}, None,
     "unexpected tensor"),
    (None, None, None, {"model.layers.0.self_attn.k_proj.loras.u.lora_A": torch.ones(R, HIDDEN)}, None,
     "places no LoRA there"),
    (None, None, {"r": 8}, None, None, "has shape [4, 128], expected [8, 128]"),
])
def test_refusals_name_the_option(tmp_path, prefix, bn, lora, extra, drop, message):
    path = unipelt_dir(tmp_path / "u", prefix, bn, lora, extra, drop)
    with pytest.raises(AdapterError, match=re.escape(message)):
        load_adapter(path, spec(), max_rank=16)


def test_a_union_of_other_parts_is_refused(tmp_path):
    path = unipelt_dir(tmp_path / "u")
    config = json.loads((path / "adapter_config.json").read_text())
    config["config"]["configs"] = config["config"]["configs"][:2]  # a gated MAM: prefix + bottleneck
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="served only as UniPELT"):
        load_adapter(path, spec(), max_rank=16)


def test_unipelt_is_not_composed():
    records = {"u": type("R", (), {"kind": "unipelt", "rank": 8})(), "l": type("R", (), {"kind": "lora", "rank": 8})()}
    with pytest.raises(AdapterError, match="kind 'unipelt', which cannot be composed"):
        plan_composition(Composition((Member("l"), Member("u"))), records, {"l": {}, "u": {}}, max_rank=64)


def test_token_gate_mixed_rows_equal_each_row_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, generator=g)
    weight, bias = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, generator=g)
    gated = torch.tensor([False, True, True])
    slots = torch.tensor([1, 0, 2, 1])
    mixed = token_gate(x, weight, bias, slots, gated)
    for n, s in enumerate(slots.tolist()):
        alone = token_gate(x[n:n + 1], weight, bias, slots[n:n + 1], gated)
        torch.testing.assert_close(mixed[n], alone[0], atol=1e-6, rtol=0)
        want = torch.sigmoid(x[n] @ weight[s].t() + bias[s]) if s else torch.ones(3, 2)
        torch.testing.assert_close(mixed[n], want, atol=1e-6, rtol=0)
    assert bool((mixed[1] == 1).all())  # an ungated row is left exactly as it is


# ---- against the library ----

PROMPTS = [[5, 72, 101, 108, 108, 111, 32, 119, 111, 114], [5, 33, 60, 99, 7, 41]]
NEW_TOKENS = 8
ADAPTERS = [  # (name, library config, kwargs)
    ("unipelt", "unipelt", {}),  # UniPELTConfig(): prefix 10 (bottleneck 512, tanh) + seq_bn rf 16 + LoRA r 8 q,v
    ("unipelt-v", "unipelt", {"prefix_tuning": {"prefix_length": 4, "flat": True, "shared_gating": False,
                                                "use_gating": True},
                              "adapter": {"config": "double_seq_bn", "kwargs": {"non_linearity": "gelu",
                                                                                "use_gating": True}},
                              "lora": {"r": 4, "alpha": 16, "attn_matrices": ["q", "k", "v"], "use_gating": True}}),
    ("houlsby", "double_seq_bn", {}),
]
GATED = [n for n, c, _ in ADAPTERS if c == "unipelt"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    if oracle_python() is None:
        pytest.skip(SKIP_REASON)
    root = tmp_path_factory.mktemp("adapterhub-unipelt")
    base, store, reference = union_oracle(root, ADAPTERS, "unipelt", PROMPTS, NEW_TOKENS)
    store.add("lora", make_lora(base, root / "lora", seed=7, r=4))
    return base, store, reference


def test_unipelt_matches_the_library_with_per_token_gates_fp32(oracle):
    base, store, reference = oracle
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    for name in GATED:
        for prompt, want, plain in zip(PROMPTS, reference[name], reference["base"]):
            ours = prefill_logits(engine, name, prompt)
            torch.testing.assert_close(ours, torch.tensor(want["logits"]), atol=1e-4, rtol=0, msg=name)
            assert (ours - torch.tensor(plain["logits"])).abs().max() > 0.05, f"{name} must visibly change the output"
        got = generate(engine, [greedy_request(name, p, NEW_TOKENS) for p in PROMPTS])
        assert got == [r["tokens"] for r in reference[name]], name


def test_distance_from_the_library_mean_gate(oracle, capsys):
    """How far the per-token gate lands from the library's own full recomputation (mean gate): printed, and
    nonzero (else the semantics question would not arise)."""
    _, _, reference = oracle
    lines = []
    for name in GATED:
        diffs, same = [], []
        for ours, lib in zip(reference[name], reference[name + ":library"]):
            diffs.append(float((torch.tensor(ours["logits"]) - torch.tensor(lib["logits"])).abs().max()))
            pairs = list(zip(ours["tokens"], lib["tokens"]))
            same.append(next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs)))
        lines.append(f"{name}: per-token vs the library's mean gate (full recomputation): max |logit diff| at the "
                     f"prompt's last token {', '.join(f'{d:.3f}' for d in diffs)}; greedy tokens equal before the "
                     f"first difference {', '.join(f'{n}/{NEW_TOKENS}' for n in same)} (per prompt)")
        assert max(diffs) > 1e-4
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_mixed_batch_with_unipelt_equals_solo(oracle):
    """[base, unipelt, lora, unipelt, houlsby] (and the variant) in one batch equal each alone."""
    base, store, _ = oracle
    loaded = load_model(base, dtype=torch.float32)
    names = [None, "unipelt", "lora", "unipelt-v", "houlsby", "unipelt"]
    prompts = [PROMPTS[i % 2][: 4 + i] for i in range(len(names))]
    alone = engine_for(loaded, store, max_batch=1)
    solo = [generate(alone, [greedy_request(n, p, NEW_TOKENS)])[0] for n, p in zip(names, prompts)]
    mixed = generate(engine_for(loaded, store, max_adapter_slots=4), [greedy_request(n, p, NEW_TOKENS)
                                                                      for n, p in zip(names, prompts)])
    assert mixed == solo
    assert len({tuple(t) for t in solo}) > 3


def test_chunked_prefill_and_prefix_cache_hits_keep_the_reference(oracle):
    """Per-token gates need no whole prompt: prompts cut into chunks of 3 tokens beside decoding rows, and a second
    round served from the prefix cache, give the library's (per-token) greedy tokens."""
    base, store, reference = oracle
    engine = engine_for(load_model(base, dtype=torch.float32), store, max_prefill_tokens=3, max_batch=3)
    for _ in range(2):
        requests = [engine.make_request(p, greedy_request(n, p, NEW_TOKENS).params, adapter=n)
                    for n in GATED for p in PROMPTS]
        engine.generate(requests)
        assert [r.output_token_ids for r in requests] == [t["tokens"] for n in GATED for t in reference[n]]
    assert any(r.num_cached_prompt_tokens > 0 for r in requests)


# ---- over HTTP ----

def test_upload_serve_and_refusals_over_http(tiny_checkpoints, tmp_path):
    """A UniPELT upload is kind unipelt and serves completions; a refused option is a 400 naming it, and so is a
    composition holding UniPELT."""
    import httpx

    from tests.api_support import adapter_files, peft_lora, serve, upload

    def parts(path: Path) -> list[tuple[str, bytes]]:
        return [(p.name, p.read_bytes()) for p in sorted(path.iterdir()) if p.is_file()]

    with serve(tiny_checkpoints["llama"], tmp_path / "store", max_lora_rank=16) as (server, _):
        response = upload(server.url, "up", parts(unipelt_dir(tmp_path / "good")))
        assert response.status_code == 201, response.text
        assert response.json()["kind"] == "unipelt"
        body = {"model": "up", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        response = upload(server.url, "bad", parts(unipelt_dir(tmp_path / "bad", lora={"intermediate_lora": True})))
        assert response.status_code == 400 and "intermediate_lora=True" in response.json()["error"]["message"]
        lora = adapter_files(peft_lora(str(tiny_checkpoints["llama"])))
        assert upload(server.url, "lora", list(lora.items())).status_code == 201
        body = {"prompt": "hello", "max_tokens": 2, "adapters": ["lora", "up"]}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 400 and "unipelt" in response.json()["error"]["message"], response.text


def test_bench_bottleneck_writes_servable_unipelt(builtin_model_dir, tmp_path):
    """loadtest.bench_bottleneck's UniPELT adapters load as what they say (gated prefix of 10, LoRA r 8 on q, v)."""
    from adapters.peft_targets import BaseSpec
    from loadtest.bench_bottleneck import write_unipelt
    from transformers import AutoConfig

    base = BaseSpec.from_hf_config(AutoConfig.from_pretrained(builtin_model_dir), "builtin")
    adapter = load_adapter(write_unipelt(tmp_path / "u", Path(builtin_model_dir), 0), base, max_rank=64)
    assert adapter.kind == "unipelt" and adapter.num_virtual_tokens == 10
    assert {m for _, m in adapter.lora} == {"q_proj", "v_proj"} and len(adapter.prefix_gates) == base.num_layers


def test_slot_threads_writing_one_layer_at_once(tiny_checkpoints, tmp_path, monkeypatch):
    """The adapter pool writes slots from several threads: the first gated slot allocates each layer's gate
    tensors, and every thread's slot must end up written (a race left some None or overwritten: seen in
    bench-bottleneck). Allocations are slowed down here so that an unlocked allocation loses the race."""
    import threading
    import time

    from server.model.adapter_layers import install_adapter_layers, write_slot

    model = load_model(tiny_checkpoints["llama"], dtype=torch.float32).model
    _, layers = install_adapter_layers(model, num_slots=12, max_rank=16)
    adapter = load_adapter(unipelt_dir(tmp_path / "u"), spec(), max_rank=16)
    start = threading.Barrier(12)
    errors = []
    zeros = torch.zeros

    def slow_zeros(*args, **kwargs):
        out = zeros(*args, **kwargs)
        time.sleep(0.002)
        return out

    monkeypatch.setattr(torch, "zeros", slow_zeros)

    def write(slot: int) -> None:
        start.wait()
        try:
            write_slot(layers, slot, adapter)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in range(1, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert not errors, errors
    for (layer, module), (_, _, weight, _) in adapter.lora.items():
        linear = layers[(layer, module)]
        assert linear.gate_slots == set(range(1, 13)) and bool(linear.gate_on[1:].all())
        torch.testing.assert_close(linear.gate_weight[1:, 0], weight.expand(12, -1))
    for gates in layers.prefix_gate.values():
        assert gates.slots == set(range(1, 13)) and bool((gates.prefix_len[1:] == P).all())
