"""The AdapterHub oracle: run by the `adapters` venv's python (scripts/adapterhub_setup.sh), never imported.

Our own top-level package is also named ``adapters``, so this file must run with a working directory and
sys.path that do not hold the repository root (tests/adapterhub_oracle.py runs it that way).

    python adapterhub_oracle.py SPECS.json OUT_DIR

SPECS: a list of SPEC (one process pays the library's import once), each written under OUT_DIR/<tag>:
SPEC: {"tag": str, "arch": "llama"|"qwen2", "vocab_size": V, "seed": s, "prompts": [[ids...], ...], "new_tokens": n,
       "adapters": [{"name": str, "config": "seq_bn"|"double_seq_bn"|"par_bn"|...|"mam"|"unipelt", "kwargs": {...},
                     "pickle": bool (save pytorch_adapter.bin, as the library must for MAM and UniPELT)}, ...]}

Writes OUT_DIR/model (a tiny random base, transformers save_pretrained), OUT_DIR/<name> (each adapter, the
library's own ``save_adapter(..., use_safetensors=True, with_head=False)``, non-trivial random weights) and
OUT_DIR/reference.json: for the base and every adapter, per prompt, the last prompt token's logits (fp32, as a
list) and the greedy continuation, both by full recomputation (``use_cache=False``: the library's cached
decoding is broken on transformers 4.57.6) with eager attention.

UniPELT (``"config": "unipelt"``) gets two references: ``<name>:library``, the library unmodified (each gate is
``mean(sigmoid(gate(x)))`` over the whole sequence, re-averaged at every recomputed step), and ``<name>``, the same
modules with the server's per-token gate (:func:`per_token_gates`): each token's own ``sigmoid(gate(x_t))``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def build_base(spec: dict, out: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=spec["vocab_size"], max_position_embeddings=512,
                  attn_implementation="eager")
    config = (Qwen2Config(tie_word_embeddings=True, **common) if spec["arch"] == "qwen2"
              else LlamaConfig(**common))
    torch.manual_seed(spec.get("seed", 0))
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                param.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.05)
            else:
                param.normal_(0, 0.15)
    model.save_pretrained(out / "model")
    return AutoModelForCausalLM.from_pretrained(out / "model", attn_implementation="eager", dtype=torch.float32)


@torch.no_grad()
def run(model, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        first = logits.tolist()
        tokens = []
        for _ in range(new_tokens):
            nxt = int(logits.argmax())
            tokens.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        results.append({"logits": first, "tokens": tokens})
    return results


def randomize(model, name: str, seed: int) -> None:
    """Non-trivial weights for the adapter's parameters (the library initialises up-projections to ~0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if f".{name}." not in pname and not pname.endswith(f".{name}"):
                continue
            scale = 0.05 if pname.endswith("bias") else 0.1
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


def make_config(entry: dict):
    """The library's config of an adapter entry: a named config with overrides, or "mam" with {"prefix_tuning":
    {PrefixTuningConfig overrides}, "adapter": {"config": name, "kwargs": {...}}} (MAMConfig's defaults otherwise)."""
    from adapters import AdapterConfig, MAMConfig, PrefixTuningConfig

    kwargs = entry.get("kwargs", {})
    if entry["config"] == "unipelt":
        from adapters import LoRAConfig, UniPELTConfig
        return UniPELTConfig(PrefixTuningConfig(**kwargs["prefix_tuning"]) if "prefix_tuning" in kwargs else None,
                             AdapterConfig.load(kwargs["adapter"]["config"], **kwargs["adapter"].get("kwargs", {}))
                             if "adapter" in kwargs else None,
                             LoRAConfig(**kwargs["lora"]) if "lora" in kwargs else None)
    if entry["config"] != "mam":
        return AdapterConfig.load(entry["config"], **kwargs)
    prefix = PrefixTuningConfig(**{"bottleneck_size": 800, **kwargs["prefix_tuning"]}) if "prefix_tuning" in kwargs \
        else None
    adapter = kwargs.get("adapter")
    return MAMConfig(prefix, AdapterConfig.load(adapter["config"], **adapter.get("kwargs", {})) if adapter else None)


class per_token_gates:
    """Patch the library's three gates (adapters 1.3.0) from ``mean over the sequence of sigmoid(gate(x))`` to each
    token's own ``sigmoid(gate(x_t))``, the server's semantics (adapters.kinds.unipelt); everything else is the
    library's own code:

    - LoRA (methods/lora.py ``LoRA.forward``): delta_t = sigmoid(gate(x_t)) * B A x_t (no alpha/r under gating);
    - bottleneck (methods/modeling.py ``Adapter.forward``): out_t = residual_t + sigmoid(gate(x_t)) * scaling * f(x_t);
    - prefix (methods/prefix_tuning.py ``PrefixTuningLayer.compose_single``): the library scales the prefix keys and
      values by the gate; per token that is query t's logits to the prefix columns times g_k(t) and its attention
      weights on them times g_v(t): done in the Llama eager attention (the only place a query sees the keys).
    """

    def __enter__(self):
        import adapters.methods.lora as lora
        import adapters.methods.modeling as modeling
        import adapters.methods.prefix_tuning as prefix
        import adapters.models.llama.modeling_llama as llama
        from transformers.models.llama.modeling_llama import repeat_kv

        self.saved = [(lora.LoRA, "forward", lora.LoRA.forward), (modeling.Adapter, "forward", modeling.Adapter.forward),
                      (prefix.PrefixTuningLayer, "compose_single", prefix.PrefixTuningLayer.compose_single),
                      (llama, "eager_attention_forward", llama.eager_attention_forward)]
        pending = {}
        eager, original = llama.eager_attention_forward, prefix.PrefixTuningLayer.compose_single

        def lora_forward(self, hidden_states, layer_input):
            assert self.use_gating
            hidden_states = layer_input if hidden_states is None else hidden_states
            hidden_states = hidden_states @ torch.t(self.lora_A) @ torch.t(self.lora_B)
            gate = torch.sigmoid(self.gate(layer_input))  # [B, T, 1]
            return hidden_states * gate, gate.mean(1)

        def adapter_forward(self, x, residual_input, output_gating=False):
            assert self.use_gating and not self.add_layer_norm_after  # the residual order then has no effect
            down = self.adapter_down(x)
            up = self.adapter_up(down)
            gate = torch.sigmoid(self.gate(x))  # [B, T, 1]
            output = up * self.scaling * gate + residual_input
            return (output, down, up, gate.mean(1)) if output_gating else (output, down, up)

        def compose_single(self, adapter_setup, state, lvl=0):
            gate = self.prefix_gates[adapter_setup]
            gates = torch.sigmoid(gate(state.residual_input))  # [B, T, 1 or 2]
            del self.prefix_gates[adapter_setup]  # the library's code without its mean gate
            try:
                out = original(self, adapter_setup, state, lvl)
            finally:
                self.prefix_gates[adapter_setup] = gate
            pending["gates"] = gates
            pending["prefix"] = out.key_states.shape[2] - state.key_states.shape[2]
            return out


        def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            gates, p = pending.pop("gates", None), pending.pop("prefix", 0)
            if gates is None:
                return eager(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)
            key_states = repeat_kv(key, module.num_key_value_groups)
            value_states = repeat_kv(value, module.num_key_value_groups)
            weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # [B, H, T, P + L]
            weights[..., :p] = weights[..., :p] * gates[:, None, :, :1]  # g_k(t)
            if attention_mask is not None:
                weights = weights + attention_mask[:, :, :, : key_states.shape[-2]]
            weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
            weights[..., :p] = weights[..., :p] * gates[:, None, :, -1:]  # g_v(t)
            return torch.matmul(weights, value_states).transpose(1, 2).contiguous(), weights

        prefix.PrefixTuningLayer.compose_single = compose_single
        lora.LoRA.forward = lora_forward
        modeling.Adapter.forward = adapter_forward
        llama.eager_attention_forward = attention
        return self

    def __exit__(self, *exc):
        for owner, attr, value in self.saved:
            setattr(owner, attr, value)


def main() -> None:
    specs = json.loads(Path(sys.argv[1]).read_text())
    for spec in specs if isinstance(specs, list) else [specs]:
        out = Path(sys.argv[2]) / spec.get("tag", "")
        out.mkdir(parents=True, exist_ok=True)
        build(spec, out)


def build(spec: dict, out: Path) -> None:
    import adapters
    from adapters import AdapterConfig

    model = build_base(spec, out)
    adapters.init(model)
    model.eval()
    reference = {"base": run(model, spec["prompts"], spec["new_tokens"])}
    for i, entry in enumerate(spec["adapters"]):
        name = entry["name"]
        config = make_config(entry)
        model.add_adapter(name, config=config)
        randomize(model, name, seed=1000 + i)
        model.set_active_adapters(name)
        model.eval()
        # MAM shares its prefix module across layers, which use_safetensors=True refuses: pickled, as users get it
        model.save_adapter(str(out / name), name, with_head=False, use_safetensors=not entry.get("pickle", False))
        reference[name] = run(model, spec["prompts"], spec["new_tokens"])
        if entry["config"] == "unipelt":
            reference[name + ":library"] = reference[name]
            with per_token_gates():
                reference[name] = run(model, spec["prompts"], spec["new_tokens"])
        model.set_active_adapters(None)
        model.delete_adapter(name)
    (out / "reference.json").write_text(json.dumps(reference))


if __name__ == "__main__":
    main()
