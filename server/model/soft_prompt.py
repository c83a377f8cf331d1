"""Virtual-token K/V of a prompt-tuning adapter: its input embeddings run once through the model.

PEFT (prompt tuning, P-tuning) prepends the embeddings ``[P, E]`` to the row's token embeddings, so
the virtual tokens sit at positions 0..P-1 and, attention being causal, their K/V in every layer
depend on nothing after them. Computing them once per adapter and writing them into each row's
cache before the prompt (like prefix tuning) gives what PEFT computes, with the prompt's rope
positions starting at P.
"""
from __future__ import annotations

import torch

from server.model.kv_cache import KVCache


@torch.inference_mode()
def soft_prompt_kv(model, embeddings: torch.Tensor) -> torch.Tensor:
    """K/V ``[layers, 2, Hkv, P, D]`` (K at [:, 0], rotary applied) of ``embeddings`` [P, E] at positions 0..P-1.

    The caller routes the forward (adapter mapping): the virtual tokens must see the base alone.
    """
    from server.model.llama import StepInputs

    args = model.args
    weight = model.model.embed_tokens.weight
    p = embeddings.shape[0]
    cache = KVCache(args.num_layers, 1, args.num_kv_heads, p, args.head_dim, weight.dtype, weight.device)
    pos = torch.arange(p, device=weight.device)[None, :]  # [1, P]
    keys = torch.arange(p, device=weight.device)[None, None, None, :]
    mask = keys <= pos[:, None, :, None]  # [1, 1, P, P] causal
    if args.sliding_window:
        mask &= keys > pos[:, None, :, None] - args.sliding_window
    step = StepInputs(cache, slice(0, 1), pos, pos, p, mask)
    model(None, step, logits_index=torch.tensor([p - 1], device=weight.device),
          inputs_embeds=embeddings.to(device=weight.device, dtype=weight.dtype)[None])
    return torch.stack((cache.k[:, 0], cache.v[:, 0]), dim=1)  # [L, 2, Hkv, P, D]
