"""`--quantization gguf`: serve a GGUF base on its own quantization grid, without requantizing.

The model directory is the one server.model.gguf converted (its ``gguf.json`` names the source file and its
sha256); the dense fp32 checkpoint there gives norms, embeddings and every tensor not served on a grid. Then, for
each linear whose GGUF tensor is

- Q4_0 (blocks of 32: fp16 d, 16 bytes of nibbles; w = (q - 8) d) or
- Q4_1 (blocks of 32: fp16 d, fp16 m, 16 bytes of nibbles; w = q d + m),

the block's codes go as they are into server.model.weight_only.Int4Linear (w = q * scale + offset, blocks of 32):
scale = d, offset = -8 d (Q4_0) or m (Q4_1). Element j of a block is the low nibble of byte j for j < 16 and the
high nibble of byte j - 16 otherwise (ggml's layout). For a Q8_0 tensor (blocks of 32: fp16 d, 32 int8 q;
w = q d) the codes and scales go into Int8Linear. llama.cpp stores q_proj / k_proj rows permuted for its rope (per
head: [0, 2, 4, ..., 1, 3, 5, ...]); the permutation is undone on the rows of codes and scales.

Where the compiled qgemm kernel is present (server/model/csrc/qgemm_cpu.cpp, the default), both run on it with
the file's d and m held in fp32, so the weights are exactly the file's (tests/test_gguf_grid.py: max difference
0.0 against the dequantized checkpoint); the activations are quantized to int8 per block of 32, as llama.cpp
does, which is the error against the dense dequantized model (measured in tests/test_gguf_grid.py). Without it,
Q4 runs on torch's int4 kernel (scale and zero rounded to the compute dtype, in bf16 a relative error of up to 2^-9
per weight) and Q8_0 as a dense compute-dtype copy.

The default model's 210 decoder linears are Q4_1 and its tied token_embd (the lm_head) is Q8_0: the lm_head is
served on the Q8_0 grid, and the embedding lookup keeps its dense table (one row per token).
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
from server.model.weight_only import BLOCK, INT4_GROUP, Int4Linear, Int8Linear

log = logging.getLogger(__name__)

MODULES = {"attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"), "attn_v": ("self_attn", "v_proj"),
           "attn_output": ("self_attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
           "ffn_down": ("mlp", "down_proj")}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # per 32 weights
GRID_TYPES = tuple(BLOCK_BYTES)
Q4_TYPES = ("Q4_0", "Q4_1")  # what has_grid looks for in the decoder linears
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
    """True when most decoder linears of the model's GGUF are Q4_0 / Q4_1 (what --quantization auto serves on its
    grid; a Q8_0 file was not measured against the dense model for auto)."""
    counts = linear_types(model_dir)
    on_grid = sum(n for t, n in counts.items() if t in Q4_TYPES)
    return on_grid > 0 and on_grid * 2 >= sum(counts.values())


def decode_q4(data: np.ndarray, type_name: str, rows: int, cols: int):
    """Raw Q4_0 / Q4_1 rows [rows, cols/32 * block bytes] uint8 -> codes [rows, cols] uint8 in [0, 15], and
    scale, offset [rows, cols/32] fp32 with w = q * scale + offset."""
    blocks = np.ascontiguousarray(data).reshape(rows, cols // INT4_GROUP, BLOCK_BYTES[type_name])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q4_1":
        qs, offset = blocks[..., 4:], blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        qs, offset = blocks[..., 2:], np.float32(-8) * d
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(offset)


def decode_q8(data: np.ndarray, rows: int, cols: int):
    """Raw Q8_0 rows [rows, cols/32 * 34] uint8 -> codes [rows, cols] int8 and scale [rows, cols/32] fp32 with
    w = q * scale."""
    blocks = np.ascontiguousarray(data).reshape(rows, cols // BLOCK, BLOCK_BYTES["Q8_0"])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return torch.from_numpy(codes), torch.from_numpy(d)


def unpermute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rope row order of q/k (convert_hf_to_gguf `permute`) on a tensor whose dim 0 is rows."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def apply_gguf_grid(model: nn.Module, model_dir: str | Path, dtype: torch.dtype) -> dict[str, int]:
    """Replace, in place, every linear of `model` (loaded dense from `model_dir`) whose GGUF tensor is Q4_0 / Q4_1
    by an Int4Linear and Q8_0 by an Int8Linear holding the file's blocks; returns {type->kind: modules}."""
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
        key = f"{type_name}->{({'Q8_0': 'int8'}.get(type_name, 'int4')) if type_name in GRID_TYPES else 'dense'}"
        served[key] = served.get(key, 0) + 1
        if type_name not in GRID_TYPES:
            continue
        cols, rows = (int(n) for n in tensor.shape)  # ggml order: ne0 = in_features
        if (rows, cols) != (dense.out_features, dense.in_features):
            raise GGUFGridError(f"{tensor.name}: GGUF shape {(rows, cols)} does not fit {name} "
                                f"{(dense.out_features, dense.in_features)}")
        if type_name == "Q8_0":
            blocks = decode_q8(tensor.data, rows, cols)
        else:
            blocks = decode_q4(tensor.data, type_name, rows, cols)
        heads = {"q_proj": args.num_heads, "k_proj": args.num_kv_heads}.get(name)
        if heads is not None:
            blocks = tuple(unpermute_rows(t, heads) for t in blocks)
        if not Int4Linear.fits(rows, cols):
            raise GGUFGridError(f"{tensor.name}: shape {(rows, cols)} does not fit the block kernels")
        cls = Int8Linear if type_name == "Q8_0" else Int4Linear
        setattr(parent, name, cls(*blocks, dense.bias, dtype))
    log.info("GGUF grid of %s: %s", src.name, ", ".join(f"{k} x{v}" for k, v in sorted(served.items())))
    return served
