"""The block-quantized GEMM kernel (server/model/csrc/qgemm_cpu.cpp) against a float reference.

The reference quantizes x per row per block of 32 the same way (d = max|x| / 127, q = round(x / d)) and
multiplies in float64 with the exact weights, so in fp32 the kernel differs from it by fp32 summation order only
(per-block integer dots are exact; the per-block fp32 scaling and accumulation across K/32 blocks is what remains).
The bf16 output adds one bf16 rounding of y. tests/test_cpu_kinds.py reruns this file on the AVX2 (x86-64-v3) and
AVX-512-without-VNNI (x86-64-v4) builds, whose dot products are maddubs/madd instead of VNNI dpbusd.
"""
import pytest
import torch


BLOCK = 32


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> the values the kernel multiplies by: round(x / d) * d per block of 32, d = max|x| / 127."""
    xf = x.double().view(x.shape[0], -1, BLOCK)
    d = (xf.abs().amax(-1, keepdim=True).float() / 127).double()  # the kernel computes d in fp32
    inv = torch.where(d > 0, (1 / d.float()).double(), torch.zeros_like(d))
    q = torch.round((xf.float() * inv.float()).double())
    return (q * d).view_as(x)


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y [M, N] in float64: quantized x @ W^T."""
    return quantized_activations(x) @ weight.double().t()


def make_weights(bits: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        scales = torch.rand(n, k // BLOCK, generator=g) * 0.02 + 1e-3
        offsets = -8 * scales + torch.randn(n, k // BLOCK, generator=g) * 0.01
        weight = codes.double() * scales.double().repeat_interleave(BLOCK, 1) + offsets.double().repeat_interleave(BLOCK, 1)
    else:
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int32)
        codes[0, :BLOCK] = -128  # the extremes of the code range in one block
        codes[0, BLOCK:2 * BLOCK] = 127
        scales = torch.rand(n, k // BLOCK, generator=g) * 0.002 + 1e-4
        offsets = torch.zeros_like(scales)
        weight = codes.double() * scales.double().repeat_interleave(BLOCK, 1)
    return codes, scales, offsets, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [32, 576, 1536])
@pytest.mark.parametrize("m", [1, 3, 32, 100])
@pytest.mark.parametrize("bits", [4, 8])
def test_qgemm_equals_the_float_reference(kernel, bits, m, k, dtype):
    n = 16 * 5 + 7  # not a multiple of the 16-row tile
    codes, scales, offsets, weight = make_weights(bits, n, k, seed=bits * 1000 + m + k)
    packed, params = kernel.qgemm_pack(codes, scales, offsets, bits)
    torch.testing.assert_close(kernel.qgemm_unpack(packed, params, n, k, bits).double(), weight, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=g)
    x[0] = 0.0  # a zero row: d = 0, every code 0, y = 0 (the Q4 offset term is d_x * sum = 0 too)
    if m > 2:
        x[1, :BLOCK] = 3e4  # extreme values: a block of one huge value, then a block with one outlier
        x[2, 5] = -1e4
    x = x.to(dtype)
    y = kernel.qgemm(x, packed, params, n, bits)
    assert y.dtype == dtype and y.shape == (m, n)
    want = reference(x, weight)
    assert (y[0] == 0).all()
    # fp32: summation order over K/32 block partials of size up to |d w d_x q| ~ |y|; bf16: + one output rounding
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-3)
    tol = 1e-5 * (k // BLOCK) ** 0.5 * scale + (2**-8 * want.abs() if dtype == torch.bfloat16 else 0)
    assert ((y.double() - want).abs() <= tol).all(), float(((y.double() - want).abs() / scale).max())
    # the activation quantization is real: against unquantized x the product moves (a test that can fail)
    plain = torch.randn(2, k, generator=g)
    y_plain = kernel.qgemm(plain, packed, params, n, bits).double()
    off_reference = (y_plain - reference(plain, weight)).abs().max()
    assert (y_plain - plain.double() @ weight.t()).abs().max() > 30 * off_reference


def test_qgemm_checks_its_inputs(kernel):
    codes, scales, offsets, _ = make_weights(4, 20, 64, seed=0)
    packed, params = kernel.qgemm_pack(codes, scales, offsets, 4)
    with pytest.raises(RuntimeError, match="K must be a positive multiple of 32"):
        kernel.qgemm(torch.randn(2, 48), packed, params, 20, 4)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernel.qgemm(torch.randn(2, 64), packed, params, 40, 4)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        kernel.qgemm(torch.randn(2, 64, dtype=torch.float64), packed, params, 20, 4)
    with pytest.raises(RuntimeError, match="4-bit code"):
        kernel.qgemm_pack(codes + 8, scales, offsets, 4)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        kernel.qgemm_pack(codes, scales, offsets, 2)
    assert kernel.qgemm(torch.randn(0, 64), packed, params, 20, 4).shape == (0, 20)
