"""Batched adapter ops: every row of a batch may use a different adapter slot.

Shapes: N rows, T tokens per row, S slots (slot 0 = identity), R rank (padded),
I in_features, O out_features.

All ops take `slot_of_row` [N] (long) and slot tensors stacked over slots, and
return exactly what applying each row's own adapter separately would give.
"""
from __future__ import annotations

import torch

from server.model import lora_ext


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot_of_row: torch.Tensor,
               rank: int) -> torch.Tensor:
    """Per-row LoRA update: out[n] = (x[n] @ A[s, :rank].T) @ B[s, :, :rank].T with s = slot_of_row[n].

    x [N, T, I], lora_a [S, Rmax, I], lora_b [S, O, Rmax] (scaling folded into B, ranks
    zero-padded, so computing only the first `rank` columns is exact when rank is the
    largest among the rows) -> [N, T, O]. Rows of slot 0 get zeros.

    Paths, chosen by measurement on CPU:
    - every row on one slot (prefill, a one-adapter batch): two plain matmuls;
    - decode (T = 1) on CPU with the compiled kernel: each row reads its factors
      straight from the slot tensors, rows in parallel, no gathered copies;
    - otherwise: gather each row's factors, then two batched matmuls.
    """
    if slot_of_row.numel() == 1 or bool((slot_of_row == slot_of_row[0]).all()):
        s = int(slot_of_row[0])
        return (x @ lora_a[s, :rank].t()) @ lora_b[s, :, :rank].t()
    if x.device.type == "cpu" and x.shape[1] == 1:
        kernel = lora_ext.kernel()
        if kernel is not None:
            return kernel.lora_delta_rows(x[:, 0].contiguous(), lora_a, lora_b, slot_of_row, rank).to(x.dtype)[:, None]
    a = lora_a[:, :rank].index_select(0, slot_of_row)          # [N, R, I]
    b = lora_b[:, :, :rank].index_select(0, slot_of_row)       # [N, O, R]
    shrunk = torch.bmm(x, a.transpose(1, 2))         # [N, T, R]
    return torch.bmm(shrunk, b.transpose(1, 2))      # [N, T, O]


def lora_delta_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         slot_of_row: torch.Tensor) -> torch.Tensor:
    """The semantics of lora_delta, one row at a time, full padded rank (for tests)."""
    return torch.stack([(x[n] @ lora_a[s].t()) @ lora_b[s].t() for n, s in enumerate(slot_of_row.tolist())])


def row_scale(y: torch.Tensor, scales: torch.Tensor, slot_of_row: torch.Tensor) -> torch.Tensor:
    """IA3: y [N, T, F] * scales[slot_of_row] [N, 1, F]; slot rows without IA3 hold ones."""
    if slot_of_row.numel() == 1:
        return y * scales[int(slot_of_row[0])]
    return y * scales.index_select(0, slot_of_row)[:, None, :]
