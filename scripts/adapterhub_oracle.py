"""The AdapterHub oracle: run by the `adapters` venv's python (scripts/adapterhub_setup.sh), never imported.

Our own top-level package is also named ``adapters``, so this file must run with a working directory and
sys.path that do not hold the repository root (tests/adapterhub_oracle.py runs it that way).

    python adapterhub_oracle.py SPECS.json OUT_DIR

SPECS: a list of SPEC (one process pays the library's import once), each written under OUT_DIR/<tag>:
SPEC: {"tag": str, "arch": "llama"|"qwen2", "vocab_size": V, "seed": s, "prompts": [[ids...], ...], "new_tokens": n,
       "adapters": [{"name": str, "config": "seq_bn"|"double_seq_bn"|"par_bn"|...|"mam", "kwargs": {...},
                     "pickle": bool (save pytorch_adapter.bin, as the library must for MAM)}, ...]}

Writes OUT_DIR/model (a tiny random base, transformers save_pretrained), OUT_DIR/<name> (each adapter, the
library's own ``save_adapter(..., use_safetensors=True, with_head=False)``, non-trivial random weights) and
OUT_DIR/reference.json: for the base and every adapter, per prompt, the last prompt token's logits (fp32, as a
list) and the greedy continuation, both by full recomputation (``use_cache=False``: the library's cached
decoding is broken on transformers 4.57.6) with eager attention.
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
    if entry["config"] != "mam":
        return AdapterConfig.load(entry["config"], **kwargs)
    prefix = PrefixTuningConfig(**{"bottleneck_size": 800, **kwargs["prefix_tuning"]}) if "prefix_tuning" in kwargs \
        else None
    adapter = kwargs.get("adapter")
    return MAMConfig(prefix, AdapterConfig.load(adapter["config"], **adapter.get("kwargs", {})) if adapter else None)


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
        model.set_active_adapters(None)
        model.delete_adapter(name)
    (out / "reference.json").write_text(json.dumps(reference))


if __name__ == "__main__":
    main()
