"""server.model.quant.dequantized_weight: the dense weight of a bitsandbytes linear, valid at every point of
its life (before its first forward, after it, and after bitsandbytes' AVX512-BF16 CPU repack of a 4-bit
weight, which happens by itself on such CPUs and is forced here on the others)."""
import pytest
import torch
from torch import nn

import bitsandbytes.functional as bnbf

from server.model.adapter_layers import AdapterLinear, BatchMapping
from server.model.quant import dequantized_weight, quantize_linear

CPU = torch.device("cpu")
OUT, IN = 512, 256  # the repacked layout needs out % 32 == 0 and in % 64 == 0


def quantized(method: str) -> tuple[nn.Linear, nn.Module]:
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=False)
    return linear, quantize_linear(linear, method, torch.float32, CPU)


def repacked(module: nn.Module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def force_repack(module: nn.Module) -> None:
    """What Linear4bit.forward does at its first eval-mode forward on an AVX512-BF16 CPU (bitsandbytes 0.50).
    A CPU without AVX512-BF16 cannot run a forward on the result; dequantizing it must still work."""
    convert = getattr(bnbf, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU repack")
    module.weight.data, module.weight.quant_state = convert(module.weight.data, module.weight.quant_state)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# method, stage, bound on the error vs the dequantization taken right after quantizing (relative to
# its largest entry): exact while the state is unchanged; bf16 rounding of absmax once repacked
CASES = [
    ("nf4", "after-forward", 2**-8),
    ("nf4", "repacked", 2**-8),
    ("fp4", "after-forward", 2**-8),
    ("fp4", "repacked", 2**-8),
    ("int8", "after-forward", 0.0),
]


@pytest.mark.parametrize("method,stage,bound", CASES)
def test_dequantized_weight_is_valid_after_forward_and_repack(method, stage, bound):
    linear, module = quantized(method)
    reference = dequantized_weight(module, torch.float32)
    assert reference.shape == (OUT, IN)
    assert relative(reference, linear.weight.detach()) < 0.15  # quantization error only
    x = torch.randn(4, IN)
    with torch.no_grad():
        y = module(x)  # on an AVX512-BF16 CPU this repacks a 4-bit weight (and computes in bf16)
    assert relative(y.float(), x @ reference.t()) < 0.05  # the forward multiplies by that matrix
    if stage == "repacked":
        if not repacked(module):
            force_repack(module)
        shape, absmax = module.weight.data.shape, module.weight.quant_state.absmax
        assert repacked(module) and shape == (OUT, IN // 2)
    after = dequantized_weight(module, torch.float32)
    assert (after - reference).abs().max().item() <= bound * reference.abs().max().item() + 1e-7
    if stage == "repacked":  # the module is left as it was
        assert repacked(module) and module.weight.data.shape == shape
        assert module.weight.quant_state.absmax is absmax


def test_adapter_linear_base_weight_over_a_repacked_nf4_base():
    """Merge-on-demand folds adapters into AdapterLinear.base_weight(): it must be the base's weight after
    the base has served (and been repacked)."""
    _, module = quantized("nf4")
    layer = AdapterLinear(module, IN, OUT, num_slots=1, max_rank=4, mapping=BatchMapping(), dtype=torch.float32,
                          device=CPU)
    before = layer.base_weight()
    with torch.no_grad():
        layer(torch.randn(2, 3, IN))
    if not repacked(module):
        force_repack(module)
    after = layer.base_weight()
    assert after.dtype == torch.float32
    assert (after - before).abs().max().item() <= 2**-8 * before.abs().max().item()


def test_plain_weight_passes_through():
    linear = nn.Linear(8, 4)
    assert torch.equal(dequantized_weight(linear, torch.float32), linear.weight.detach())
    assert dequantized_weight(linear, torch.bfloat16).dtype == torch.bfloat16


def test_dora_scale_and_merge_over_a_repacked_nf4_base():
    """DoRA's column norms (computed when a slot is written) and a merged slot's folded weight, written before
    and after bitsandbytes' AVX512-BF16 repack (forced here on any CPU), agree within the repack's bf16
    rounding of absmax: neither reads the repacked layout as if it were the portable one (on Zen 4 that
    read was 7-9 off in the logits)."""
    torch.manual_seed(1)
    _, module = quantized("nf4")
    layer = AdapterLinear(module, IN, OUT, num_slots=2, max_rank=4, mapping=BatchMapping(), dtype=torch.float32,
                          device=CPU)
    a, b, magnitude = torch.randn(4, IN) * 0.1, torch.randn(OUT, 4) * 0.1, torch.rand(OUT) + 0.5
    layer.set_lora(1, a, b, 2.0)
    layer.set_dora(1, magnitude)
    scale, (folded, _) = layer.dora_scale[1].clone(), layer.folded(1)
    if not repacked(module):
        force_repack(module)
    layer.set_lora(2, a, b, 2.0)
    layer.set_dora(2, magnitude)
    torch.testing.assert_close(layer.dora_scale[2], scale, rtol=2**-8, atol=0)
    torch.testing.assert_close(layer.folded(2)[0], folded, rtol=0, atol=2**-8 * folded.abs().max().item())
    assert (layer.dora_scale[2] - 1).abs().max() > 0.05  # the magnitude matters: a wrong norm cannot hide
