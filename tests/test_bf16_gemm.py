"""The bf16 GEMV of decode (server/model/csrc/bf16_gemm_cpu.cpp, `bf16_linear`) against torch, over a table of
shapes, and PackedLinear's choice between it and aten (server/model/packed_linear.py).

Which instruction-set path runs depends on the -march of the build: AVX512-BF16 dot products here on a Zen 4,
AVX-512F or AVX2 FMA in the x86-64-v4 / -v3 builds of tests/test_cpu_kinds.py (KERNEL_TESTS), which run this file.

Error bound: the reference is the exact fp32 product of the same bf16 (or fp32) values (torch in fp64, so its own
order does not matter); ours sums the exact products in fp32 in another order than oneDNN's. For K terms of size
|x||w| that is at most ~K * 2^-24 * sum|x_k w_k| (a loose bound, met with a margin of 4), plus, for a bf16 output,
one rounding to bf16: half an ulp, 2^-9 relative.
"""
import pytest
import torch
from torch import nn

from server.model import cpu_features, packed_linear
from server.model.packed_linear import PackedLinear

MS = [1, 3, 17, 32]  # rows of x: 17 and 3 leave partial tiles of 4
KS = [64, 576, 1536, 100]  # SmolLM2's hidden and intermediate sizes; 100: a tail for every vector width (32, 16, 8)
NS = [1, 7, 129]  # not multiples of the 4-row block


def case(m, k, n, x_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    weight = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    return x, weight, bias


def check(got, x, weight, bias):
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ weight.double().abs().T
    bound = 4 * x.shape[1] * 2**-24 * magnitude + 1e-30
    if got.dtype == torch.bfloat16:
        bound = bound + exact.abs() * 2**-8  # one rounding of the result (half an ulp = 2^-9; margin 2)
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_bf16_linear_equals_the_exact_product(kernel, m, k, x_dtype, with_bias):
    for n in NS:
        x, weight, bias = case(m, k, n, x_dtype, seed=m * 1000 + k + n)
        bias = bias if with_bias else None
        got = kernel.bf16_linear(x, weight, bias)
        assert got.dtype == x_dtype and got.shape == (m, n)
        check(got, x, weight, bias)


def test_bf16_linear_takes_an_fp32_bias_and_no_rows(kernel):
    x, weight, bias = case(5, 576, 33, torch.bfloat16, 7)
    check(kernel.bf16_linear(x, weight, bias.float()), x, weight, bias.float())
    assert kernel.bf16_linear(x[:0], weight).shape == (0, 33)


def test_bf16_linear_refuses_bad_inputs(kernel):
    x, weight, bias = case(2, 64, 8, torch.bfloat16, 3)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernel.bf16_linear(x, weight.float())
    with pytest.raises(RuntimeError, match="x must be"):
        kernel.bf16_linear(x[:, :32], weight)
    with pytest.raises(RuntimeError, match="x must be"):
        kernel.bf16_linear(x[:, ::2], weight[:, :32].contiguous())  # not contiguous
    with pytest.raises(RuntimeError, match="bias must be"):
        kernel.bf16_linear(x, weight, bias[:3])


@pytest.mark.parametrize("rows", [1, 3, packed_linear.GEMV_MAX_ROWS, packed_linear.GEMV_MAX_ROWS + 1, 70])
def test_packed_linear_serves_small_bf16_batches_from_the_plain_matrix(monkeypatch, kernel, rows):
    """bf16 on a native-bf16 CPU (forced, so every kind runs it): the matrix is held plain (shared, not copied) and
    packed; small M goes through the kernel, larger through oneDNN; weight/set_weight round-trip (merges use them)."""
    monkeypatch.setattr(cpu_features, "cpu_has_fast_bf16", lambda: True)
    linear = nn.Linear(576, 129, bias=True).bfloat16().requires_grad_(False)
    layer = PackedLinear(linear, batch_hint=16)
    assert layer.gemv and layer.nbytes == 129 * 576 * 2
    assert layer.weight.data_ptr() == linear.weight.data_ptr()  # shared, not copied (a tied lm_head)
    calls = []
    monkeypatch.setattr(packed_linear.cpu_ext, "kernel", lambda: CountingKernel(kernel, calls))
    x = torch.randn(rows, 1, 576).bfloat16()
    check(layer(x).reshape(rows, 129), x.reshape(rows, 576), linear.weight, linear.bias)
    assert len(calls) == (rows <= packed_linear.GEMV_MAX_ROWS)
    new = torch.randn(129, 576).bfloat16()
    layer.set_weight(new)
    assert torch.equal(layer.weight, new)
    check(layer(x).reshape(rows, 129), x.reshape(rows, 576), new, linear.bias)
    assert torch.equal(layer.packed.to_dense(), new)  # both copies follow set_weight


def test_a_packed_linear_can_be_held_for_onednn_only(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_has_fast_bf16", lambda: True)
    linear = nn.Linear(64, 9, bias=False).bfloat16().requires_grad_(False)
    layer = PackedLinear(linear, batch_hint=1, gemv=False)  # the lm_head (pack_linears)
    assert not layer.gemv and layer.plain is None
    x = torch.randn(1, 64).bfloat16()
    check(layer(x), x, linear.weight, None)
    assert torch.equal(layer.weight, linear.weight)


def test_packed_linear_without_native_bf16_keeps_onednn_or_aten(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_has_fast_bf16", lambda: False)
    assert not packed_linear.gemv_available(torch.device("cpu"), torch.bfloat16)
    assert not packed_linear.gemv_available(torch.device("cpu"), torch.float32)
    linear = nn.Linear(64, 9).requires_grad_(False)
    layer = PackedLinear(linear, batch_hint=4)  # fp32: oneDNN-packed as before
    assert not layer.gemv and layer.nbytes == 9 * 64 * 4
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


class CountingKernel:
    def __init__(self, module, calls):
        self.module, self.calls = module, calls

    def bf16_linear(self, *args):
        self.calls.append(args[0].shape)
        return self.module.bf16_linear(*args)


def _tiny_model() -> nn.Module:
    """model.model.layers[i].{self_attn, mlp} holding bf16 nn.Linears, and an lm_head: what pack_linears walks."""
    model, inner = nn.Module(), nn.Module()
    layer = nn.Module()
    layer.self_attn, layer.mlp = nn.Module(), nn.Module()
    layer.self_attn.q_proj = nn.Linear(64, 64, bias=False)
    layer.mlp.up_proj = nn.Linear(64, 128, bias=False)
    inner.layers = nn.ModuleList([layer])
    model.model, model.lm_head = inner, nn.Linear(64, 9, bias=False)
    return model.bfloat16().requires_grad_(False)


PLAIN_BYTES = (64 * 64 + 128 * 64) * 2  # the decoder linears' bf16 bytes of _tiny_model


@pytest.mark.parametrize("available, held", [
    (None, True),                          # no /proc/meminfo: held
    (PLAIN_BYTES * 4, True),               # exactly PLAIN_COPY_MAX_SHARE (0.25) of what is available: held
    (PLAIN_BYTES * 4 - 2, False),          # a little over the share: oneDNN alone
    (PLAIN_BYTES * 1000, True),
])
def test_plain_copies_are_held_only_within_the_memory_share(monkeypatch, kernel, available, held):
    monkeypatch.setattr(cpu_features, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(packed_linear, "available_bytes", lambda: available)
    assert packed_linear.PLAIN_COPY_MAX_SHARE == 0.25
    model = _tiny_model()
    want = {name: m.weight.clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert packed_linear.pack_linears(model, batch_hint=1) == 3
    decoder = [model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.up_proj]
    assert all(m.gemv == held and (m.plain is not None) == held for m in decoder)
    assert not model.lm_head.gemv  # the lm_head is oneDNN-only either way
    x = torch.randn(1, 64).bfloat16()
    check(decoder[1](x), x, want["model.layers.0.mlp.up_proj"], None)
