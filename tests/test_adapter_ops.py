"""The batched adapter ops against their one-row-at-a-time semantics, on every path."""
import pytest
import torch

from server.model import cpu_ext
from server.model.adapter_ops import add_lora, lora_delta_reference, row_scale

S, RMAX, I, O = 6, 8, 64, 48


@pytest.fixture
def slots():
    torch.manual_seed(0)
    a = torch.randn(S, RMAX, I)
    b = torch.randn(S, RMAX, O)
    a[0], b[0] = 0, 0                       # slot 0 is the identity
    a[2, 4:], b[2, 4:] = 0, 0               # slot 2 has rank 4, zero-padded
    return a, b


@pytest.mark.parametrize("rows, t", [([1, 2, 3, 0, 5, 1], 1), ([3, 3, 3], 1), ([2], 7), ([0, 4], 3)])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_lora_delta_matches_row_by_row(slots, rows, t, use_kernel, monkeypatch):
    a, b = slots
    if not use_kernel:
        monkeypatch.setattr(cpu_ext, "kernel", lambda: None)
    elif cpu_ext.kernel() is None:
        pytest.skip("no compiler for the CPU kernel here")
    x, y = torch.randn(len(rows), t, I), torch.randn(len(rows), t, O)
    slot_of_row = torch.tensor(rows)
    expected = y + lora_delta_reference(x, a, b, slot_of_row)
    uniform = rows[0] if len(set(rows)) == 1 else None
    torch.testing.assert_close(add_lora(y.clone(), x, a, b, slot_of_row, RMAX), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(add_lora(y.clone(), x, a, b, slot_of_row, RMAX, uniform), expected, atol=1e-4,
                               rtol=1e-5)


def test_lora_delta_at_smaller_rank_is_exact_for_lower_rank_slots(slots):
    a, b = slots
    x, y = torch.randn(2, 1, I), torch.randn(2, 1, O)
    rows = torch.tensor([2, 0])
    torch.testing.assert_close(add_lora(y.clone(), x, a, b, rows, 4), y + lora_delta_reference(x, a, b, rows),
                               atol=1e-4, rtol=1e-5)


def test_kernel_handles_bfloat16(slots):
    if cpu_ext.kernel() is None:
        pytest.skip("no compiler for the CPU kernel here")
    a, b = (t.bfloat16() for t in slots)
    x, y = torch.randn(4, 1, I).bfloat16(), torch.randn(4, 1, O).bfloat16()
    rows = torch.tensor([1, 3, 5, 0])
    out = add_lora(y.clone(), x, a, b, rows, RMAX)
    assert out.dtype == torch.bfloat16
    expected = y.float() + lora_delta_reference(x.float(), a.float(), b.float(), rows)
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.02)
    torch.testing.assert_close(out[3], y[3])  # slot 0 rows are untouched


@pytest.mark.parametrize("i, o, rank", [(64, 48, 8), (576, 192, 16), (37, 21, 5), (80, 200, 3), (7, 3, 1)])
def test_bfloat16_kernel_rounds_once_to_nearest_even(i, o, rank):
    """The hand-vectorized bf16 path (AVX-512 / AVX2; lora_cpu.cpp), its tails (in % 16, out % 16) included: y + delta
    with the delta accumulated in fp32 and rounded to bf16 once. Against the fp32 reference rounded once: equal to
    within one bf16 step (the order of the fp32 sums differs), and a NaN in y stays NaN."""
    if cpu_ext.kernel() is None:
        pytest.skip("no compiler for the CPU kernel here")
    torch.manual_seed(i * 1000 + o)
    s = 5
    a, b = torch.randn(s, rank + 2, i).bfloat16(), torch.randn(s, rank + 2, o).bfloat16()
    a[0], b[0] = 0, 0  # slot 0 is the identity
    x, y = torch.randn(6, 1, i).bfloat16(), torch.randn(6, 1, o).bfloat16()
    y[4, 0, o // 2] = float("nan")
    rows = torch.tensor([1, 3, 4, 0, 2, 1])
    out = add_lora(y.clone(), x, a, b, rows, rank)
    delta = lora_delta_reference(x.float(), a[:, :rank].float(), b[:, :rank].float(), rows)
    expected = (y.float() + delta).bfloat16()
    step = expected.float().abs().clamp_min(1e-30) * 2.0 ** -7  # one bf16 step (8 significant bits)
    finite = ~expected.isnan()
    diff = (out.float() - expected.float()).abs()[finite]
    assert (diff <= step[finite]).all()
    assert (diff == 0).float().mean() >= 0.97  # rounded to nearest: truncation would miss about half
    assert out[4, 0, o // 2].isnan() and int(finite.logical_not().sum()) == 1
    assert torch.equal(out[3], y[3])  # slot 0 untouched


def test_row_scale():
    scales = torch.rand(S, O) + 0.5
    y = torch.randn(3, 2, O)
    rows = torch.tensor([0, 4, 4])
    expected = torch.stack([y[n] * scales[s] for n, s in enumerate(rows.tolist())])
    torch.testing.assert_close(row_scale(y, scales, rows), expected)


def test_kernel_reads_each_slot_only_to_its_own_rank(slots):
    """slot_rank bounds each row's rank (garbage past it is never read) and rank 0 skips the row."""
    if cpu_ext.kernel() is None:
        pytest.skip("no compiler for the CPU kernel here")
    a, b = (t.clone() for t in slots)
    a[2, 4:], b[2, 4:] = 1e6, 1e6          # past slot 2's rank 4
    slot_rank = torch.tensor([0, RMAX, 4, RMAX, 0, RMAX])  # slot 4 holds no LoRA in this layer
    x, y = torch.randn(4, 1, I), torch.randn(4, 1, O)
    rows = torch.tensor([2, 1, 4, 2])
    clean_a, clean_b = a.clone(), b.clone()
    clean_a[2, 4:], clean_b[2, 4:], clean_a[4], clean_b[4] = 0, 0, 0, 0
    expected = y + lora_delta_reference(x, clean_a, clean_b, rows)
    torch.testing.assert_close(add_lora(y.clone(), x, a, b, rows, RMAX, slot_rank=slot_rank), expected, atol=1e-4,
                               rtol=1e-5)
