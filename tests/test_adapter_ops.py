"""The batched adapter ops against their one-row-at-a-time semantics, on every path."""
import pytest
import torch

from server.model import lora_ext
from server.model.adapter_ops import lora_delta, lora_delta_reference, row_scale

S, RMAX, I, O = 6, 8, 64, 48


@pytest.fixture
def slots():
    torch.manual_seed(0)
    a = torch.randn(S, RMAX, I)
    b = torch.randn(S, O, RMAX)
    a[0], b[0] = 0, 0                       # slot 0 is the identity
    a[2, 4:], b[2, :, 4:] = 0, 0            # slot 2 has rank 4, zero-padded
    return a, b


@pytest.mark.parametrize("rows, t", [([1, 2, 3, 0, 5, 1], 1), ([3, 3, 3], 1), ([2], 7), ([0, 4], 3)])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_lora_delta_matches_row_by_row(slots, rows, t, use_kernel, monkeypatch):
    a, b = slots
    if not use_kernel:
        monkeypatch.setattr(lora_ext, "kernel", lambda: None)
    elif lora_ext.kernel() is None:
        pytest.skip("no compiler for the CPU kernel here")
    x = torch.randn(len(rows), t, I)
    slot_of_row = torch.tensor(rows)
    expected = lora_delta_reference(x, a, b, slot_of_row)
    torch.testing.assert_close(lora_delta(x, a, b, slot_of_row, RMAX), expected, atol=1e-4, rtol=1e-5)


def test_lora_delta_at_smaller_rank_is_exact_for_lower_rank_slots(slots):
    a, b = slots
    x = torch.randn(2, 1, I)
    rows = torch.tensor([2, 0])
    torch.testing.assert_close(lora_delta(x, a, b, rows, 4), lora_delta_reference(x, a, b, rows), atol=1e-4,
                               rtol=1e-5)


def test_kernel_handles_bfloat16(slots):
    if lora_ext.kernel() is None:
        pytest.skip("no compiler for the CPU kernel here")
    a, b = (t.bfloat16() for t in slots)
    x = torch.randn(4, 1, I).bfloat16()
    rows = torch.tensor([1, 3, 5, 0])
    torch.testing.assert_close(lora_delta(x, a, b, rows, RMAX).float(),
                               lora_delta_reference(x.float(), a.float(), b.float(), rows), atol=0.1, rtol=0.02)


def test_row_scale():
    scales = torch.rand(S, O) + 0.5
    y = torch.randn(3, 2, O)
    rows = torch.tensor([0, 4, 4])
    expected = torch.stack([y[n] * scales[s] for n, s in enumerate(rows.tolist())])
    torch.testing.assert_close(row_scale(y, scales, rows), expected)
