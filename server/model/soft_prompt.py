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


def soft_prompt_kv(mapping, embeddings: torch.Tensor, merged: bool, slot: int = 0,
                   layer_state: frozenset[str] = frozenset()) -> torch.Tensor:
    """K/V ``[layers, 2, Hkv, P, D]`` (K at [:, 0], rotary applied) of ``embeddings`` [P, E] at positions 0..P-1,
    through the base with `slot`'s per-layer state (`layer_state`: what the slot holds; slot 0, the base alone,
    for a prompt-tuning adapter; a composition's slot, whose LoRA / IA3 PEFT applies to the virtual tokens too).
    With an adapter merged (`merged` true) the row goes through the base's own product. The routing of
    `mapping` (a BatchMapping) is restored afterwards."""
    saved = dict(vars(mapping))
    device = mapping.model.model.embed_tokens.weight.device
    row = torch.full((1,), slot, dtype=torch.long, device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    vars(mapping).update(slot_of_row=row, slots_present=frozenset({slot}), uniform_slot=slot,
                         any_lora="lora" in layer_state, any_ia3="ia3" in layer_state, any_dora="dora" in layer_state,
                         merged_correction=zero if merged else None, active=True)
    try:
        return _forward_kv(mapping.model, embeddings)
    finally:
        vars(mapping).update(saved)


@torch.inference_mode()
def _forward_kv(model, embeddings: torch.Tensor) -> torch.Tensor:
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
    k, v = cache.read_row(cache.row_tables[0], p)  # [L, Hkv, P, D]
    return torch.stack((k, v), dim=1)  # [L, 2, Hkv, P, D]
