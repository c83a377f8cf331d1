"""Prefix tuning (PEFT ``peft_type: PREFIX_TUNING``): per-layer K/V placed before the prompt.

On a GQA model PEFT sets ``token_dim = num_key_value_heads * head_dim`` and
``num_attention_heads = num_key_value_heads``; ``prompt_embeddings`` is
``[num_virtual_tokens, num_layers * 2 * token_dim]`` whose last dimension is laid out as
``(layer, k_or_v, kv_head, head_dim)`` with K before V. ``prefix_projection: true`` adapters are
served too: PEFT saves the *projected* KV (the MLP's output, same shape) and, loaded for
inference, serves exactly that tensor without the MLP (``get_prompt`` with ``inference_mode``).
The K/V are raw cache entries (PEFT applies no rotary embedding to them); the prompt's positions
start at ``num_virtual_tokens``. Nothing is written into the layers' slots; nothing folds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from adapters.kinds.base import Adapter
from adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_tensor
from adapters.peft_targets import BaseSpec

PROMPT_FIELDS = frozenset({"num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads",
                           "num_transformer_submodules"})


def check_virtual_tokens(config: dict) -> None:
    """The prompt-learning config fields every virtual-token kind shares."""
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise AdapterError(f"{CONFIG_NAME} field num_virtual_tokens must be a positive integer, got {n!r}")
    if config.get("num_transformer_submodules", 1) not in (None, 1):
        raise AdapterError(f"{CONFIG_NAME} sets num_transformer_submodules="
                           f"{config['num_transformer_submodules']}: encoder-decoder prompts are not served")


def single_prompt_tensor(shapes: dict, want: tuple[int, ...], what: str, layout: str) -> str:
    """The key of the one ``prompt_embeddings`` tensor, checked against ``want``."""
    unexpected = sorted(k for k in shapes if k not in ("prompt_embeddings", "prompt_embeddings.default"))
    if unexpected or len(shapes) != 1:
        raise AdapterError(f"unexpected tensor {(unexpected or sorted(shapes))[0]!r} in {WEIGHTS_NAME}: a "
                           f"{what} adapter holds exactly one tensor, prompt_embeddings")
    key = next(iter(shapes))
    if shapes[key] != want:
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} has shape {list(shapes[key])}, expected {list(want)} "
                           f"= {layout}; the {what} adapter does not fit this base")
    return key


@dataclass
class PrefixAdapter(Adapter):
    """``prefix``: ``[num_layers, 2, num_kv_heads, num_virtual_tokens, head_dim]``.

    ``prefix[i, 0]`` is the K and ``prefix[i, 1]`` the V that PEFT puts into layer ``i``'s KV cache
    before the prompt (``get_prompt(...).layers[i].keys[0]`` / ``.values[0]``, each
    ``[kv_heads, num_virtual_tokens, head_dim]``). ``prefix[:, 0]`` / ``prefix[:, 1]`` are
    ``[layers, Hkv, P, D]``, the layout ``KVCache.write_prefix`` takes.
    """

    prefix: torch.Tensor | None = None

    kind: ClassVar[str] = "prefix"
    config_fields: ClassVar[frozenset[str]] = PROMPT_FIELDS | {"encoder_hidden_size", "prefix_projection"}

    @classmethod
    def matches(cls, config: dict) -> bool:
        return str(config.get("peft_type", "")).upper() == "PREFIX_TUNING"

    @classmethod
    def check_config(cls, config: dict) -> None:
        check_virtual_tokens(config)

    @classmethod
    def load(cls, name: str, config: dict, base: BaseSpec, shapes: dict, handle: Any, *, max_rank: int,
             dtype: torch.dtype) -> "PrefixAdapter":
        n = config["num_virtual_tokens"]
        token_dim = base.num_kv_heads * base.head_dim  # PEFT's GQA rule (#1901)
        expected = {"num_layers": base.num_layers, "num_attention_heads": base.num_kv_heads, "token_dim": token_dim}
        for key, want in expected.items():
            got = config.get(key)
            if got is not None and got != want:
                raise AdapterError(
                    f"{CONFIG_NAME} field {key} is {got} but this base needs {want} (layers={base.num_layers}, "
                    f"kv_heads={base.num_kv_heads}, head_dim={base.head_dim}); the prefix was made for another base "
                    "(or by a PEFT older than 0.12, before grouped-query attention support)")
        key = single_prompt_tensor(shapes, (n, base.num_layers * 2 * token_dim), "prefix-tuning",
                                   "[num_virtual_tokens, layers * 2 * kv_heads * head_dim]")
        emb = load_tensor(handle, key, dtype)
        # [P, L*2*Hkv*D] -> [P, 2L, Hkv, D] (PEFT's view) -> [2L, Hkv, P, D] (PEFT's permute, batch dropped)
        # -> [L, 2, Hkv, P, D]: PEFT splits 2L into per-layer pairs, K first.
        kv = emb.view(n, base.num_layers * 2, base.num_kv_heads, base.head_dim).permute(1, 2, 0, 3)
        prefix = kv.reshape(base.num_layers, 2, base.num_kv_heads, n, base.head_dim).contiguous()
        return cls(name=name, config=config, prefix=prefix, num_virtual_tokens=n, nbytes=prefix.nbytes)

    def prefix_kv(self) -> torch.Tensor | None:
        return self.prefix
