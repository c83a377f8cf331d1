"""Tiny Llama-family checkpoints built from configs, written to disk like real ones.

Weights are random but non-trivial: norms and biases are randomised too, so a
loader that drops one of them fails the golden tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from server.model import builtin

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}


def make_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny `arch` checkpoint (hidden 128, 2 layers, GQA 4/2 heads) with the built-in tokenizer."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    tokenizer = builtin.build_tokenizer()
    ids = {t: tokenizer.token_to_id(t) for t in builtin.SPECIAL_TOKENS}
    config = config_cls(**{
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": 512,
        "bos_token_id": ids["<|bos|>"], "eos_token_id": ids["<|eos|>"], "pad_token_id": ids["<|pad|>"],
        **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                param.normal_(0, 0.5)     # spread logits so greedy decoding is not a constant
            elif name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.05)
            else:  # decoder linears strong enough that the residual stream moves away from the input token
                param.normal_(0, 0.15)
    model.save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    configs = builtin._configs(tokenizer)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (path / name).write_text(json.dumps(configs[name]))
    return path
