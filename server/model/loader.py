"""Load a local Hugging Face checkpoint (Llama, Mistral, Qwen2) into our Transformer.

Weights are read from the checkpoint's safetensors by name (single file or
sharded with model.safetensors.index.json); pickle checkpoints are refused.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from server.model.llama import ModelArgs, Transformer, rope_inv_freq
from server.model.packed_linear import pack_linears, packing_available
from server.model.quant import BNB_METHODS, quantize_decoder_linears, weight_bytes
from server.model.weight_only import WEIGHT_ONLY, quantize_weight_only

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: Transformer
    hf_config: object
    tokenizer: object
    name: str
    dtype: torch.dtype
    quantization: str
    weight_bytes: int
    generation_config: object | None = None


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}") from None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(
            f"{path} holds only pickle weights (.bin/.pt), which this server never loads: convert with "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)`"
        )
    raise FileNotFoundError(f"no model.safetensors in {path}")


def load_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        for name, tensor in load_file(str(file)).items():
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, quantization: str = "none",
               device: str | torch.device = "cpu", pack: bool = True, batch_hint: int = 16) -> LoadedModel:
    """Build our Transformer from a checkpoint directory; quantize decoder linears if asked.

    pack: on CPU in float32 (bf16 where native), hold dense linear weights pre-packed for oneDNN (packed_linear).
    quantization: none, a bitsandbytes method (quant.BNB_METHODS), int8-wo / int4-wo (weight_only) or gguf
    (gguf_grid: the source GGUF's Q4 blocks as they are; `path` must be a converted GGUF directory).
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
    device = torch.device(device)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    args = ModelArgs.from_hf_config(hf_config)
    inv_freq, rope_scaling = rope_inv_freq(hf_config)
    with torch.device("meta"):
        model = Transformer(args, inv_freq, rope_scaling)
    # Quantization starts from the checkpoint's values in fp32 (as transformers does for
    # an fp32 checkpoint), so NF4 blocks are identical to the reference's.
    load_dtype = torch.float32 if quantization != "none" else dtype
    state = load_state_dict(path, load_dtype)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if args.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit {args.architecture}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = inv_freq
    model.tie_weights()
    if quantization in WEIGHT_ONLY or quantization == "gguf":
        if device.type != "cpu":
            raise ValueError(f"--quantization {quantization} runs on CPU only (torch's CPU weight-only kernels)")
        if quantization == "gguf":
            from server.model.gguf_grid import apply_gguf_grid

            apply_gguf_grid(model, path, dtype)
        else:
            quantize_weight_only(model, quantization, dtype)
        model.to(device=device, dtype=dtype)  # the dense rest; quantized codes are integer buffers
    elif quantization in BNB_METHODS:
        quantize_decoder_linears(model, quantization, dtype, device)
        _cast_unquantized(model, dtype, device)
    else:
        model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    model.inv_freq = inv_freq.to(device)
    if pack and quantization not in BNB_METHODS and packing_available(device, dtype):
        pack_linears(model, batch_hint)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    loaded = LoadedModel(model=model, hf_config=hf_config, tokenizer=tokenizer, name=path.name, dtype=dtype,
                         quantization=quantization, weight_bytes=weight_bytes(model),
                         generation_config=_generation_config(path))
    log.info("loaded %s (%s, %d layers, hidden %d) as %s/%s: weights %.1f MiB resident", path.name,
             args.architecture, args.num_layers, args.hidden_size, str(dtype).removeprefix("torch."), quantization,
             loaded.weight_bytes / 2**20)
    return loaded


def _cast_unquantized(model: Transformer, dtype: torch.dtype, device: torch.device) -> None:
    """Cast the float parameters bitsandbytes did not take over (embeddings, norms, lm_head, biases)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if type(param) is torch.nn.Parameter and param.is_floating_point():  # not Params4bit / Int8Params
                setattr(module, name, torch.nn.Parameter(param.data.to(device=device, dtype=dtype), requires_grad=False))
    model.tie_weights()


def _generation_config(path: Path):
    if not (path / "generation_config.json").exists():
        return None
    return GenerationConfig.from_pretrained(path, local_files_only=True)
