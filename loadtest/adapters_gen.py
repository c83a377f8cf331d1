"""Many real PEFT-format adapters for a base model, fast.

Instantiating a PEFT model per adapter takes seconds on the benchmark base, too slow for
512 adapters. So PEFT makes ONE template adapter per kind (LoRA, IA3, prefix tuning, with
non-trivial weights as in ``tests/peft_adapters.py``), and every other adapter of that kind
is the template's ``adapter_config.json`` plus a ``adapter_model.safetensors`` with the
same keys, shapes and dtypes whose values are redrawn from a seeded RNG: still exactly
what PEFT writes and reads (``PeftModel.load_adapter`` loads them), each one different.

Names are ``<kind>-<index:04d>``; adapter ``lora-0003`` is the same file in every scenario
of a run, so our server and the peers serve identical weights.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loadtest.workload import GENERATED_KINDS, adapter_name

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterSpec:
    """One generated adapter on disk."""

    name: str
    kind: str
    path: Path


def make_template(kind: str, base_dir: Path, dest: Path, *, rank: int = 16, prefix_tokens: int = 8,
                  seed: int = 0) -> Path:
    """One adapter of ``kind`` made by PEFT itself on ``base_dir``, saved in PEFT format at ``dest``."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if kind in ("lora", "dora", "lorabias"):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS),
                            init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM",
                            use_dora=kind == "dora", lora_bias=kind == "lorabias")
    elif kind == "prompt":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_tokens)
    elif kind == "ia3":
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                           task_type="CAUSAL_LM")
    elif kind == "prefix":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_tokens)
    else:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {', '.join(GENERATED_KINDS)}")
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(dest, safe_serialization=True)
    perturb(dest, dest, kind, seed)  # the values every adapter of this kind is drawn like
    return dest


def _draw(kind: str, key: str, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """New values for one tensor: non-trivial, so that an ignored adapter shows in the output."""
    shape = like.shape
    if kind == "ia3":
        values = torch.rand(shape, generator=gen) * 1.6 + 0.2          # scales in [0.2, 1.8]
    elif "lora_magnitude_vector" in key:                               # DoRA: the template's m, rescaled
        return (like.float() * (torch.rand(shape, generator=gen) + 0.5)).to(like.dtype).contiguous()
    elif "lora_A" in key:
        values = torch.randn(shape, generator=gen) / shape[-1] ** 0.5  # PEFT's kaiming-like scale
    elif "lora_B" in key:
        values = torch.randn(shape, generator=gen) * 0.1              # lora_B (and its bias): clearly non-zero
    else:
        values = torch.randn(shape, generator=gen)                    # prefix prompt_embeddings
    return values.to(like.dtype).contiguous()


def perturb(template: Path, dest: Path, kind: str, seed: int) -> Path:
    """Write at ``dest`` the template's config and its weights redrawn with ``seed`` (same keys and shapes)."""
    dest.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(template / WEIGHTS_NAME, framework="pt") as f:
        metadata = f.metadata()
        for key in sorted(f.keys()):
            tensors[key] = _draw(kind, key, f.get_tensor(key), gen)
    save_file(tensors, str(dest / WEIGHTS_NAME), metadata=metadata)
    if template != dest:
        shutil.copyfile(template / CONFIG_NAME, dest / CONFIG_NAME)
    return dest


class AdapterFactory:
    """Adapters of every kind for one base, made on demand under ``root`` and kept there."""

    def __init__(self, base_dir: Path, root: Path, *, rank: int = 16, prefix_tokens: int = 8, seed: int = 0):
        self.base_dir, self.root = Path(base_dir), Path(root)
        self.rank, self.prefix_tokens, self.seed = rank, prefix_tokens, seed
        self._templates: dict[str, Path] = {}

    def template(self, kind: str) -> Path:
        if kind not in self._templates:
            path = self.root / "templates" / kind
            if not (path / WEIGHTS_NAME).is_file():
                log.info("making the %s template with PEFT", kind)
                make_template(kind, self.base_dir, path, rank=self.rank, prefix_tokens=self.prefix_tokens,
                              seed=self.seed)
            self._templates[kind] = path
        return self._templates[kind]

    def get(self, kind: str, index: int) -> AdapterSpec:
        """Adapter ``index`` of ``kind`` (written on first use; the same bytes for the same seed)."""
        name = adapter_name(kind, index)
        path = self.root / name
        if not (path / WEIGHTS_NAME).is_file():
            seed = (self.seed * 1_000_003 + GENERATED_KINDS.index(kind) * 100_003 + index) % 2**63
            perturb(self.template(kind), path, kind, seed)
        return AdapterSpec(name, kind, path)

    def many(self, names: list[str]) -> list[AdapterSpec]:
        """The adapters called ``names`` (``<kind>-<index>``)."""
        out = []
        for name in names:
            kind, _, index = name.rpartition("-")
            out.append(self.get(kind, int(index)))
        return out


def register(store_dir: Path, adapters: list[AdapterSpec]) -> int:
    """Add to the adapter store at ``store_dir`` those of ``adapters`` it does not hold; returns how many."""
    from adapters.store import AdapterNotFound, AdapterStore

    store = AdapterStore(store_dir)
    added = 0
    for spec in adapters:
        try:
            store.get(spec.name)
            continue
        except AdapterNotFound:
            pass
        store.add(spec.name, spec.path)
        added += 1
    return added



def main(argv: list[str] | None = None) -> None:
    """Generate adapters into an adapter store, e.g. to give ``make serve`` something for locust to ask for."""
    import argparse

    from loadtest.workload import parse_mix, ranked_adapters

    parser = argparse.ArgumentParser(prog="python -m loadtest.adapters_gen", description=main.__doc__)
    parser.add_argument("--model", default="builtin", help="'builtin', 'bench' or a checkpoint directory")
    parser.add_argument("--store", type=Path, required=True, help="adapter store to add them to (--adapter-dir)")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--mix", default="lora=0.5,ia3=0.25,prefix=0.25")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="where generated files go (default: <store>.gen)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from loadtest.harness import resolve_model

    model = resolve_model(args.model)
    factory = AdapterFactory(model, args.work or args.store.with_name(args.store.name + ".gen"), rank=args.rank,
                             prefix_tokens=args.prefix_tokens, seed=args.seed)
    added = register(args.store, factory.many(ranked_adapters(args.count, parse_mix(args.mix))))
    log.info("%d adapters added to %s (model %s)", added, args.store, model)


if __name__ == "__main__":
    main()
