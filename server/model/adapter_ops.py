"""Batched adapter ops: every row of a batch may use a different adapter slot.

Shapes: N rows, T tokens per row, S slots (slot 0 = identity), R rank (padded),
I in_features, O out_features.

All ops take `slot_of_row` [N] (long) and slot tensors stacked over slots, and
return exactly what applying each row's own adapter separately would give.
"""
from __future__ import annotations

import torch


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot_of_row: torch.Tensor) -> torch.Tensor:
    """Per-row LoRA update: out[n] = (x[n] @ A[s].T) @ B[s].T with s = slot_of_row[n].

    x [N, T, I], lora_a [S, R, I], lora_b [S, O, R] (scaling folded into B) -> [N, T, O].
    Rows whose slot has no LoRA get zeros (their slot rows are zero).

    One gather of each row's factors, then two batched matmuls: cost is reading
    N*(R*I + O*R) numbers, no per-row Python. When every row uses the same slot
    (prefill, or a batch of one adapter) it degrades to two plain matmuls.
    """
    if slot_of_row.numel() == 1 or bool((slot_of_row == slot_of_row[0]).all()):
        s = int(slot_of_row[0])
        return (x @ lora_a[s].t()) @ lora_b[s].t()
    a = lora_a.index_select(0, slot_of_row)          # [N, R, I]
    b = lora_b.index_select(0, slot_of_row)          # [N, O, R]
    shrunk = torch.bmm(x, a.transpose(1, 2))         # [N, T, R]
    return torch.bmm(shrunk, b.transpose(1, 2))      # [N, T, O]


def lora_delta_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         slot_of_row: torch.Tensor) -> torch.Tensor:
    """The semantics of lora_delta, one row at a time (for tests)."""
    return torch.stack([(x[n] @ lora_a[s].t()) @ lora_b[s].t() for n, s in enumerate(slot_of_row.tolist())])


def row_scale(y: torch.Tensor, scales: torch.Tensor, slot_of_row: torch.Tensor) -> torch.Tensor:
    """IA3: y [N, T, F] * scales[slot_of_row] [N, 1, F]; slot rows without IA3 hold ones."""
    if slot_of_row.numel() == 1:
        return y * scales[int(slot_of_row[0])]
    return y * scales.index_select(0, slot_of_row)[:, None, :]
