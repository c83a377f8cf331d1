"""Adapters made by PEFT itself, with non-trivial weights, saved in PEFT's on-disk format."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM


def _save(model, path: Path, base_dir: Path) -> Path:
    model.peft_config["default"].base_model_name_or_path = base_dir.name
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_lora(base_dir: Path, path: Path, seed: int, r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
              **kw) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                        lora_dropout=0.0, **kw)
    model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's non-zero init is small; make the delta clearly visible in outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:  # lora_B.bias too (lora_bias=True)
                param.normal_(0, 0.1)
            elif name.endswith(".bias") and param.requires_grad:  # bias="all"/"lora_only": "trained" base biases
                param.add_(torch.randn_like(param) * 0.3)
    return _save(model, path, base_dir)


def make_dora(base_dir: Path, path: Path, seed: int, r: int = 8,
              targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), **kw) -> Path:
    """A DoRA adapter (use_dora) with a visible LoRA delta and a magnitude that is *not* PEFT's initial
    ||W + sBA|| (scaled per feature by U(0.5, 1.5)), so a server that ignored either would fail."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                        lora_dropout=0.0, use_dora=True, **kw)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
            elif "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
            elif name.endswith(".bias") and param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    return _save(model, path, base_dir)


def make_ia3(base_dir: Path, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.uniform_(0.2, 1.8)
    return _save(model, path, base_dir)


def make_prefix(base_dir: Path, path: Path, seed: int, num_virtual_tokens: int = 5) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    model = get_peft_model(model, config)
    return _save(model, path, base_dir)


def make_prompt(base_dir: Path, path: Path, seed: int, num_virtual_tokens: int = 6, p_tuning: bool = False) -> Path:
    """Prompt tuning (random virtual-token embeddings, scaled up to be visible) or P-tuning (PEFT saves its MLP
    encoder's output, which is what it serves)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=32)
              if p_tuning else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens))
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prompt_encoder" in name and param.requires_grad:
                param.normal_(0, 1.0)
    return _save(model, path, base_dir)


def perturbed_copies(src: Path, root: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct adapters in PEFT's format: src's config, its tensors with seeded noise added."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        path = root / f"{src.name}-{i}"
        path.mkdir(parents=True)
        shutil.copy(src / "adapter_config.json", path / "adapter_config.json")
        noisy = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
        save_file(noisy, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        out.append(path)
    return out
