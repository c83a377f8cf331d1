"""`--quantization gguf`: serve a GGUF base on its own quantization grid, without requantizing.

The model directory is the one server.model.gguf converted (its ``gguf.json`` names the source file and its
sha256); the dense fp32 checkpoint there gives norms, embeddings and every tensor not served on a grid. Then, for
each linear whose GGUF tensor is

- Q4_0 (blocks of 32: fp16 d, 16 bytes of nibbles; w = (q - 8) d) or
- Q4_1 (blocks of 32: fp16 d, fp16 m, 16 bytes of nibbles; w = q d + m),

the block's codes go as they are into the int4 kernel (server.model.weight_only.Int4Linear, group 32, whose
formula is w = (q - 8) * scale + zero): scale = d, zero = 0 (Q4_0) or m + 8 d (Q4_1). Element j of a block is
the low nibble of byte j for j < 16 and the high nibble of byte j - 16 otherwise (ggml's layout). llama.cpp
stores q_proj / k_proj rows permuted for its rope (per head: [0, 2, 4, ..., 1, 3, 5, ...]); the permutation is
undone on the rows of codes, scales and zeros.

How exact: in fp32 compute the kernel's w equals the dequantized file's up to fp32 rounding of (q - 8) d + zero
against q d + m: measured on SmolLM2 the weights are identical and the logits 4.5e-5 from the dense dequantized
model (tests/test_gguf_grid.py). In bf16 compute, scale and
zero are held in bf16 (the kernel takes them in the activations' dtype): a relative error of up to 2^-9 on
each weight, the same order as bf16 itself.

Q8_0 (blocks of 32 with one fp16 scale each) and every other type stay dense in the compute dtype (oneDNN-packed
where server.model.packed_linear packs): torch's int8 kernel scales per output channel, not per block of 32, so it
cannot hold Q8_0 without requantizing. The default model's tied token_embd (the lm_head) is Q8_0, so its lm_head
is dense; all its 210 decoder linears are Q4_1.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from server.model.gguf import MARKER, file_sha256
from server.model.weight_only import INT4_GROUP, Int4Linear

log = logging.getLogger(__name__)

MODULES = {"attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"), "attn_v": ("self_attn", "v_proj"),
           "attn_output": ("self_attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
           "ffn_down": ("mlp", "down_proj")}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # per 32 weights
GRID_TYPES = tuple(BLOCK_BYTES)
_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class GGUFGridError(ValueError):
    """--quantization gguf for a model that did not come from a GGUF file, or whose file changed."""


def gguf_source(model_dir: str | Path) -> Path | None:
    """The GGUF file a converted model directory was made from, or None if it was not made from one."""
    try:
        marker = json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return Path(marker["source"]) if "source" in marker else None


@functools.lru_cache(maxsize=2)
def _reader(path: str):
    from gguf import GGUFReader

    return GGUFReader(path)  # memory-mapped; parsing its fields (the vocabulary) takes ~4 s here


def linear_types(model_dir: str | Path) -> dict[str, int]:
    """{GGUF tensor type name: count} over the file's decoder linears (empty if the model is not from a GGUF)."""
    src = gguf_source(model_dir)
    if src is None or not src.is_file():
        return {}
    counts: dict[str, int] = {}
    for tensor in _reader(str(src)).tensors:
        match = _NAME.fullmatch(tensor.name)
        if match and match.group(2) in MODULES:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def has_grid(model_dir: str | Path) -> bool:
    """True when most decoder linears of the model's GGUF are on a grid this module serves (Q4_0 / Q4_1)."""
    counts = linear_types(model_dir)
    on_grid = sum(n for t, n in counts.items() if t in GRID_TYPES)
    return on_grid > 0 and on_grid * 2 >= sum(counts.values())


def decode_q4(data: np.ndarray, type_name: str, rows: int, cols: int):
    """Raw Q4_0 / Q4_1 rows [rows, cols/32 * block bytes] uint8 -> codes [rows, cols] uint8 in [0, 15], and
    scale, zero [rows, cols/32] fp32 with w = (q - 8) * scale + zero."""
    blocks = np.ascontiguousarray(data).reshape(rows, cols // INT4_GROUP, BLOCK_BYTES[type_name])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs, zero = blocks[..., 4:], m + np.float32(8) * d
    else:
        qs, zero = blocks[..., 2:], np.zeros_like(d)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero)


def unpermute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rope row order of q/k (convert_hf_to_gguf `permute`) on a tensor whose dim 0 is rows."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def apply_gguf_grid(model: nn.Module, model_dir: str | Path, dtype: torch.dtype) -> dict[str, int]:
    """Replace, in place, every linear of `model` (loaded dense from `model_dir`) whose GGUF tensor is Q4_0 / Q4_1 by
    an Int4Linear holding the file's blocks; returns {type name: modules served on the grid or kept dense}."""
    src = gguf_source(model_dir)
    if src is None:
        raise GGUFGridError(f"--quantization gguf needs a model loaded from a .gguf file; {model_dir} was not "
                            "(choose int4-wo or int8-wo to quantize a checkpoint)")
    marker = json.loads((Path(model_dir) / MARKER).read_text())
    if not src.is_file() or file_sha256(src) != marker.get("sha256"):
        raise GGUFGridError(f"{src}, which {model_dir} was converted from, is missing or changed; pass the .gguf "
                            "file itself as --model")
    args = model.args
    served: dict[str, int] = {}
    for tensor in _reader(str(src)).tensors:
        type_name = tensor.tensor_type.name
        match = _NAME.fullmatch(tensor.name)
        if match and match.group(2) in MODULES:
            parent_name, name = MODULES[match.group(2)]
            parent = getattr(model.model.layers[int(match.group(1))], parent_name)
        elif tensor.name == "output.weight" or (tensor.name == "token_embd.weight" and args.tie_word_embeddings):
            parent, name = model, "lm_head"
        else:
            continue
        dense = getattr(parent, name)
        key = f"{type_name}->{'int4' if type_name in GRID_TYPES else 'dense'}"
        served[key] = served.get(key, 0) + 1
        if type_name not in GRID_TYPES:
            continue
        cols, rows = (int(n) for n in tensor.shape)  # ggml order: ne0 = in_features
        if (rows, cols) != (dense.out_features, dense.in_features):
            raise GGUFGridError(f"{tensor.name}: GGUF shape {(rows, cols)} does not fit {name} "
                                f"{(dense.out_features, dense.in_features)}")
        codes, scales, zeros = decode_q4(tensor.data, type_name, rows, cols)
        heads = {"q_proj": args.num_heads, "k_proj": args.num_kv_heads}.get(name)
        if heads is not None:
            codes, scales, zeros = (unpermute_rows(t, heads) for t in (codes, scales, zeros))
        if not Int4Linear.fits(rows, cols):
            raise GGUFGridError(f"{tensor.name}: shape {(rows, cols)} does not fit the int4 kernel")
        setattr(parent, name, Int4Linear(codes, scales, zeros, dense.bias, dtype))
    log.info("GGUF grid of %s: %s", src.name, ", ".join(f"{k} x{v}" for k, v in sorted(served.items())))
    return served
