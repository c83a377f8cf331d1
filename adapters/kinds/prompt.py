"""Prompt tuning and P-tuning (PEFT ``PROMPT_TUNING``, ``P_TUNING``): virtual-token input embeddings.

Both save one tensor, ``prompt_embeddings`` ``[num_virtual_tokens, hidden]`` (P-tuning saves its
prompt encoder's *output*, and PEFT loaded for inference serves exactly that tensor: ``get_prompt``
with ``inference_mode`` returns ``prompt_encoder.embedding.weight``, into which the saved tensor is
loaded). PEFT concatenates them before the row's token embeddings and runs the base over the
whole sequence: the virtual tokens take positions 0..P-1 (rotary included), the prompt starts at
P, and the attention mask is all ones over the virtual tokens. Since attention is causal, the
virtual tokens' per-layer K/V do not depend on the prompt: the server runs them through the base
once, when the slot is written, and from then on serves them like a prefix (K/V written into the
row's cache before the prompt, prompt positions from P). Nothing is written into the layers'
slots; nothing folds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from adapters.kinds.base import Adapter
from adapters.kinds.prefix import PROMPT_FIELDS, check_virtual_tokens, single_prompt_tensor
from adapters.peft_files import CONFIG_NAME, AdapterError, load_tensor
from adapters.peft_targets import BaseSpec


@dataclass
class PromptAdapter(Adapter):
    """``embeddings``: ``[num_virtual_tokens, hidden]``, the input embeddings placed before the prompt."""

    embeddings: torch.Tensor | None = None

    kind: ClassVar[str] = "prompt"
    config_fields: ClassVar[frozenset[str]] = PROMPT_FIELDS | {
        "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
        "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"}

    @classmethod
    def matches(cls, config: dict) -> bool:
        return str(config.get("peft_type", "")).upper() in ("PROMPT_TUNING", "P_TUNING")

    @classmethod
    def check_config(cls, config: dict) -> None:
        check_virtual_tokens(config)

    @classmethod
    def load(cls, name: str, config: dict, base: BaseSpec, shapes: dict, handle: Any, *, max_rank: int,
             dtype: torch.dtype) -> "PromptAdapter":
        n = config["num_virtual_tokens"]
        for key, want in (("num_layers", base.num_layers), ("token_dim", base.hidden_size)):
            got = config.get(key)
            if got is not None and got != want:
                raise AdapterError(f"{CONFIG_NAME} field {key} is {got} but this base needs {want} (layers="
                                   f"{base.num_layers}, hidden={base.hidden_size}); the prompt was made for another "
                                   "base")
        key = single_prompt_tensor(shapes, (n, base.hidden_size), "prompt-tuning",
                                   "[num_virtual_tokens, hidden_size]")
        emb = load_tensor(handle, key, dtype)
        return cls(name=name, config=config, embeddings=emb, num_virtual_tokens=n, nbytes=emb.nbytes)

    def soft_prompt(self) -> torch.Tensor | None:
        return self.embeddings
