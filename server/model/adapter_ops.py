"""Batched adapter ops: every row of a batch may use a different adapter slot.

Shapes: N rows, T tokens per row, S slots (slot 0 = identity), R rank (padded),
I in_features, O out_features.

All ops take `slot_of_row` [N] (long) and slot tensors stacked over slots, and
return exactly what applying each row's own adapter separately would give.
LoRA factors are stored as vLLM's "shrink" and "expand" matrices: A [S, R, I] and
B [S, R, O], so both products read their factor rows contiguously.
"""
from __future__ import annotations

import torch

from server.model import cpu_ext


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot_of_row: torch.Tensor,
             rank: int, uniform_slot: int | None = None, slot_rank: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row LoRA update: y[n] + (x[n] @ A[s, :rank].T) @ B[s, :rank] with s = slot_of_row[n].

    y [N, T, O] (the base output; may be updated in place and returned), x [N, T, I],
    lora_a [S, Rmax, I], lora_b [S, Rmax, O] (scaling folded into B, ranks zero-padded,
    so computing only the first `rank` rows is exact when rank is the largest among the
    rows' slots). Rows of slot 0 are left as they are. `uniform_slot`: the one slot
    every row uses, when the caller knows it. `slot_rank` [S] (optional): each slot's
    own rank, so the kernel reads no padding (0 = no LoRA: the row is skipped).

    Paths, chosen by measurement on CPU:
    - every row on one slot (prefill of one request, a one-adapter batch): two plain matmuls;
    - CUDA with triton installed: the SGMV kernels of triton_ops (any T);
    - decode (T = 1) on CPU with the compiled kernel: each row reads its factors
      straight from the slot tensors, rows in parallel, no gathered copies, the delta
      accumulated into y in fp32;
    - otherwise: gather each row's factors, then two batched matmuls.
    """
    if uniform_slot is not None or slot_of_row.numel() == 1:
        s = int(slot_of_row[0]) if uniform_slot is None else uniform_slot
        return y + (x @ lora_a[s, :rank].t()) @ lora_b[s, :rank] if s else y
    if x.is_cuda and _triton_ops():
        return _triton_ops().add_lora(y, x, lora_a, lora_b, slot_of_row, rank, slot_rank)
    if x.device.type == "cpu" and x.shape[1] == 1:
        kernel = cpu_ext.kernel()
        if kernel is not None:
            y = y.contiguous()
            if slot_rank is None:
                slot_rank = torch.full((lora_a.shape[0],), rank, dtype=torch.long)
            kernel.add_lora_rows_(y.view(y.shape[0], -1), x.reshape(x.shape[0], -1).contiguous(), lora_a, lora_b,
                                  slot_of_row, slot_rank, rank)
            return y
    a = lora_a[:, :rank].index_select(0, slot_of_row)          # [N, R, I]
    b = lora_b[:, :rank].index_select(0, slot_of_row)          # [N, R, O]
    return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b)  # [N, T, R] @ [N, R, O]


_triton = None  # server.model.triton_ops once checked usable, False if not (checked at the first CUDA call)


def _triton_ops():
    global _triton
    if _triton is None:
        from server.model import triton_ops
        _triton = triton_ops if triton_ops.available() else False
    return _triton


def lora_delta_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         slot_of_row: torch.Tensor) -> torch.Tensor:
    """The delta add_lora adds, one row at a time, full padded rank (for tests)."""
    return torch.stack([(x[n] @ lora_a[s].t()) @ lora_b[s] for n, s in enumerate(slot_of_row.tolist())])


def row_scale(y: torch.Tensor, scales: torch.Tensor, slot_of_row: torch.Tensor) -> torch.Tensor:
    """IA3: y [N, T, F] * scales[slot_of_row] [N, 1, F]; slot rows without IA3 hold ones (CUDA: triton_ops)."""
    if slot_of_row.numel() == 1:
        return y * scales[int(slot_of_row[0])]
    if y.is_cuda and _triton_ops():
        return _triton_ops().row_scale(y, scales, slot_of_row)
    return y * scales.index_select(0, slot_of_row)[:, None, :]


def token_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slot_of_row: torch.Tensor,
               gated: torch.Tensor, uniform_slot: int | None = None) -> torch.Tensor:
    """UniPELT's gate per token (adapters.kinds.unipelt): ``sigmoid(x_t @ weight[s].T + bias[s])``.

    x [N, T, I], weight [S, G, I], bias [S, G], gated [S] bool (the slots that hold a gate here) -> [N, T, G];
    rows whose slot holds no gate get exactly 1, so multiplying by the result leaves them bit for bit unchanged.
    """
    if uniform_slot is not None or slot_of_row.numel() == 1:
        s = int(slot_of_row[0]) if uniform_slot is None else uniform_slot
        if not bool(gated[s]):
            return torch.ones(*x.shape[:2], weight.shape[1], dtype=x.dtype, device=x.device)
        return torch.sigmoid(torch.nn.functional.linear(x, weight[s], bias[s]))
    g = torch.sigmoid(torch.baddbmm(bias.index_select(0, slot_of_row)[:, None, :], x,
                                    weight.index_select(0, slot_of_row).transpose(1, 2)))  # [N, T, G]
    return torch.where(gated.index_select(0, slot_of_row)[:, None, None], g, torch.ones_like(g))
