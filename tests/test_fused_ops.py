"""The fused CPU kernels of the decoder layer's elementwise ops (server/model/csrc/norm_act_cpu.cpp) against their
torch references (server.model.fused_ops.*_reference), over dtypes and shapes, and the dispatch that picks them."""
import pytest
import torch

from server.model import cpu_ext, fused_ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 576), (3, 5, 64), (32, 1, 576), (2, 7), (4, 1, 1536), (1, 1, 3)]  # last dim: hidden / intermediate
# agree with the reference to the dtype's rounding: fp32 to the order of the sum of squares; bf16/fp16 within an
# ulp of the output (the fp32 sum's order or exp's last bit can move a value across a rounding boundary)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
       torch.float16: dict(atol=1e-3, rtol=1e-3)}


def inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    other = torch.randn(shape, generator=gen).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(dtype)
    return x, other, weight


def close_in_ulps(got, expected, dtype):
    """Equal but for a few elements one rounding step apart (fp32: the sum's order)."""
    torch.testing.assert_close(got, expected, **TOL[dtype])
    if dtype != torch.float32:  # most elements bit-identical: the same intermediates are rounded
        assert (got != expected).float().mean() <= 0.05, (got != expected).float().mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_equals_the_reference(kernel, dtype, shape):
    x, _, weight = inputs(shape, dtype, 0)
    got = kernel.rms_norm(x, weight, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    close_in_ulps(got, fused_ops.rms_norm_reference(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_updates_the_residual_and_equals_the_reference(kernel, dtype, shape):
    acc, other, weight = inputs(shape, dtype, 1)
    expected_norm, expected_sum = fused_ops.add_rms_norm_reference(acc, other, weight, 1e-6)
    before = other.clone()
    got = kernel.add_rms_norm_(acc, other, weight, 1e-6)
    assert torch.equal(acc, expected_sum)  # the add is exact: one rounding, like torch's
    assert torch.equal(other, before)
    close_in_ulps(got, expected_norm, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_mul_equals_the_reference(kernel, dtype, shape):
    gate, up, _ = inputs(shape, dtype, 2)
    expected = fused_ops.silu_mul_reference(gate, up)
    got = kernel.silu_mul_(gate, up)
    assert got.data_ptr() == gate.data_ptr()  # in place
    close_in_ulps(got, expected, dtype)


def test_large_rows_run_in_parallel_and_agree(kernel):
    """Enough rows that at::parallel_for splits them (a prefill chunk)."""
    acc, other, weight = inputs((512, 576), torch.bfloat16, 3)
    expected_norm, expected_sum = fused_ops.add_rms_norm_reference(acc, other, weight, 1e-5)
    close_in_ulps(kernel.add_rms_norm_(acc, other, weight, 1e-5), expected_norm, torch.bfloat16)
    assert torch.equal(acc, expected_sum)
    gate, up, _ = inputs((64, 1536), torch.bfloat16, 4)
    close_in_ulps(kernel.silu_mul_(gate.clone(), up), fused_ops.silu_mul_reference(gate, up), torch.bfloat16)


def test_kernels_reject_what_they_cannot_do(kernel):
    x, other, weight = inputs((2, 8), torch.float32, 5)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel.rms_norm(x, weight.double(), 1e-5)
    with pytest.raises(RuntimeError, match="weight \\[E\\]"):
        kernel.rms_norm(x, weight[:4], 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.rms_norm(x.t(), weight[:2], 1e-5)
    with pytest.raises(RuntimeError, match="acc's shape"):
        kernel.add_rms_norm_(x, other[:1], weight, 1e-5)
    with pytest.raises(RuntimeError, match="one shape and dtype"):
        kernel.silu_mul_(x, other.bfloat16())


@pytest.mark.parametrize("case", ["no kernel", "grad wanted", "mixed dtypes", "not contiguous", "fp32"])
def test_dispatch_falls_back_to_the_reference_and_never_writes_inputs_there(case, monkeypatch):
    x, other, weight = inputs((3, 16), torch.float32 if case == "fp32" else torch.bfloat16, 6)
    if case == "no kernel":
        monkeypatch.setattr(cpu_ext, "kernel", lambda: None)
    elif case == "grad wanted":
        x.requires_grad_(True)
    elif case == "mixed dtypes":
        weight, other = weight.double(), other.double()
    else:
        x, other = x.t().contiguous().t(), other.t().contiguous().t()
    x_before, other_before = x.detach().clone(), other.clone()
    normed, total = fused_ops.add_rms_norm(x, other, weight, 1e-5)
    assert torch.equal(x.detach(), x_before) and torch.equal(other, other_before)  # the reference writes nothing
    expected_norm, expected_sum = fused_ops.add_rms_norm_reference(x_before, other_before, weight, 1e-5)
    assert torch.equal(total.detach(), expected_sum) and torch.equal(normed.detach(), expected_norm)
    gate = x.detach().clone().requires_grad_(case == "grad wanted")
    assert torch.equal(fused_ops.silu_mul(gate, other).detach(), fused_ops.silu_mul_reference(x_before, other))
    assert torch.equal(gate.detach(), x_before)
    if case == "grad wanted":  # the reference keeps the graph
        fused_ops.rms_norm(x, weight, 1e-5).sum().backward()
        assert x.grad is not None


def test_dispatch_uses_the_kernel_in_inference(kernel):
    acc, other, weight = inputs((1, 1, 576), torch.bfloat16, 7)
    storage = acc.data_ptr()
    with torch.inference_mode():
        normed, total = fused_ops.add_rms_norm(acc, other, weight, 1e-5)
        out = fused_ops.silu_mul(normed, other)
    assert total.data_ptr() == storage and out.data_ptr() == normed.data_ptr()  # the kernels ran, in place
