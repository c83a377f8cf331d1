"""Weight-only int8 / int4 bases on CPU (`--quantization int8-wo | int4-wo`, server.model.weight_only).

The oracle is the dequantized model: the same checkpoint with every quantized linear replaced by a dense linear
holding exactly the weights the kernel multiplies by (`module.weight`). In fp32 the quantized model equals it up to
summation order (bound 1e-4 on logits ~10, measured ~1e-5); greedy tokens are identical. Every adapter kind over a
quantized base equals the same adapter over the dequantized model, and a merge (a dense compute-dtype copy, never
re-quantized) equals the unmerged adapter.
"""
import pytest
import torch
from torch import nn

from adapters.store import AdapterStore
from server.model import cpu_features
from server.model.adapter_layers import AdapterLinear, BatchMapping
from server.model.loader import load_model
from server.model.merge import dense_linear
from server.model.packed_linear import PackedLinear, packing_available
from server.model.weight_only import INT4_GROUP, QGEMM_ENV, Int4Linear, Int8Linear, is_weight_only
from tests.peft_adapters import make_dora, make_ia3, make_lora, make_prefix, make_prompt
from tests.test_qgemm import quantized_activations
from tests.test_adapters_golden import engine_for, generate, greedy_request, prefill_logits

CPU = torch.device("cpu")
METHODS = ["int8-wo", "int4-wo"]
KINDS = ["lora", "dora", "ia3", "prefix", "prompt"]
FP32_BOUND = 1e-4  # logits of a tiny model (max |logit| ~ 5-10); fp32 summation order only
# qgemm (activations int8 per block of 32) against the dequantized model, relative to max |logit|: measured on the
# tiny random qwen2 (Zen 4, 2026-12-03): 0.023-0.033 (int8-wo) and 0.024-0.044 (int4-wo) over the six kinds (its
# random weights and few layers make large activation outliers per block); the real model's is in
# tests/test_gguf_grid.py
QGEMM_REL = 0.06


@pytest.mark.parametrize("qgemm", ["1", "0"])
def test_int4_formula_is_q_times_scale_plus_offset(monkeypatch, qgemm):
    """The dequantization (read back through Int4Linear.weight: qgemm's fp32 values, or torch's int4 kernel on an
    identity, which computes (q - 8) * scale + (offset + 8 scale)) is q * scale + offset per group."""
    monkeypatch.setenv(QGEMM_ENV, qgemm)
    torch.manual_seed(0)
    n, k = 48, 96
    codes = torch.randint(0, 16, (n, k))
    scales, zeros = torch.rand(n, k // INT4_GROUP) + 0.1, torch.randn(n, k // INT4_GROUP)
    module = Int4Linear(codes, scales, zeros, None, torch.float32)
    want = codes.float() * scales.repeat_interleave(INT4_GROUP, 1) + zeros.repeat_interleave(INT4_GROUP, 1)
    torch.testing.assert_close(module.weight, want, rtol=2**-22, atol=1e-6)  # fp32: the multiply-add rounds once
    x = torch.randn(3, 5, k)
    # qgemm quantizes x per block of 32 (tests/test_qgemm.py's reference); torch's int4 kernel does not
    xq = x if module._kernel is None else quantized_activations(x.view(-1, k)).float().view_as(x)
    torch.testing.assert_close(module(x), xq @ want.t(), rtol=1e-5, atol=1e-4)  # fp32 order; |y| up to ~30


@pytest.mark.parametrize("cls,bound", [(Int8Linear, 0.5 / 127), (Int4Linear, 0.5 / 15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_round_trip_and_forward(cls, bound, dtype):
    """Quantization error within half a step of the grid (per block range), and the kernel's product equals
    x @ weight^T in fp32 (to summation order; on qgemm with x quantized per block of 32 as the kernel does) and in
    bf16 (to a few bf16 rounding steps)."""
    torch.manual_seed(1)
    weight, bias = torch.randn(64, 128), torch.randn(64)
    module = cls.quantize(weight, bias, dtype)
    blocks = weight.abs().view(64, -1, INT4_GROUP).amax(-1).repeat_interleave(INT4_GROUP, 1)
    span = blocks * 2 if cls is Int8Linear else 2 * weight.abs().max()
    assert ((module.weight.float() - weight).abs() <= bound * span * 1.01 + 2**-7 * weight.abs()).all()
    x = torch.randn(2, 3, 128, dtype=dtype)
    xq = x.float() if module._kernel is None else quantized_activations(x.view(-1, 128)).float().view_as(x)
    want = xq @ module.weight.float().t() + module.bias.float()
    tol = 1e-4 if dtype == torch.float32 else 2**-7 * want.abs().max().item()  # bf16: one rounding step of |y|
    torch.testing.assert_close(module(x).float(), want, rtol=0, atol=tol)
    assert module(x).dtype == dtype and module(x).shape == (2, 3, 64)


def dequantized_model(quantized, path, dtype):
    """The checkpoint loaded dense, every weight-only module of `quantized` replaced by a dense linear holding its
    dequantized weight (the lm_head untied where it was quantized)."""
    dense = load_model(path, dtype=dtype, pack=False)
    q_model, d_model = quantized.model, dense.model
    for (name, module) in q_model.named_modules():
        if is_weight_only(module):
            parent_name, _, child = name.rpartition(".")
            parent = d_model.get_submodule(parent_name) if parent_name else d_model
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
            linear.weight.data.copy_(module.weight)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias)
            setattr(parent, child, linear.requires_grad_(False))
    return dense


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    base = tiny_checkpoints["qwen2"]  # q/k/v biases: the quantized modules carry them
    root = tmp_path_factory.mktemp("weight-only")
    paths = {"lora": make_lora(base, root / "lora", seed=11),
             "dora": make_dora(base, root / "dora", seed=12, targets=("q_proj", "v_proj", "down_proj")),
             "ia3": make_ia3(base, root / "ia3", seed=13),
             "prefix": make_prefix(base, root / "prefix", seed=14),
             "prompt": make_prompt(base, root / "prompt", seed=15)}
    store = AdapterStore(root / "store")
    for name, path in paths.items():
        store.add(name, path)
    return base, store


@pytest.mark.parametrize("method", METHODS)
def test_fp32_logits_and_greedy_equal_the_dequantized_model_for_every_kind(monkeypatch, setup, method):
    """On torch's kernels (ADAPTER_SERVER_QGEMM=0): no activation quantization, so fp32 is exact."""
    monkeypatch.setenv(QGEMM_ENV, "0")
    base, store = setup
    quantized = load_model(base, dtype=torch.float32, quantization=method)
    assert is_weight_only(quantized.model.lm_head)  # the lm_head too
    assert sum(is_weight_only(m) for m in quantized.model.modules()) == 7 * quantized.model.args.num_layers + 1
    dense = dequantized_model(quantized, base, torch.float32)
    ours, theirs = (engine_for(m, store, max_adapter_slots=5) for m in (quantized, dense))
    for name in [None, *KINDS]:
        q_logits, d_logits = prefill_logits(ours, name), prefill_logits(theirs, name)
        assert (q_logits - d_logits).abs().max() <= FP32_BOUND, (name, float((q_logits - d_logits).abs().max()))
        assert generate(ours, [greedy_request(name)]) == generate(theirs, [greedy_request(name)]), name
    base_logits = prefill_logits(ours, None)
    names = [None, *KINDS]  # batch invariance (fp32: bf16 kernels sum in another order at M=1 than at M=6)
    solo = [generate(engine_for(quantized, store, max_batch=1, max_adapter_slots=5), [greedy_request(n)])[0]
            for n in names]
    assert generate(engine_for(quantized, store, max_adapter_slots=5), [greedy_request(n) for n in names]) == solo
    # the quantization itself changes the model (a test that cannot fail otherwise proves nothing)
    original = engine_for(load_model(base, dtype=torch.float32, pack=False), store, max_adapter_slots=5)
    assert (prefill_logits(original, None) - base_logits).abs().max() > 10 * FP32_BOUND


@pytest.mark.parametrize("method", METHODS)
def test_qgemm_logits_within_the_activation_quantization_bound_for_every_kind(setup, method):
    """On qgemm (the default where it compiles) x is quantized to int8 per block of 32 before every GEMM, as in
    llama.cpp: fp32 logits move from the dequantized model by QGEMM_REL of their largest magnitude (measured
    below), greedy tokens may part at a near-tie; rows stay independent (batch invariance holds exactly)."""
    base, store = setup
    quantized = load_model(base, dtype=torch.float32, quantization=method)
    if quantized.model.lm_head._kernel is None:
        pytest.skip("qgemm is not compiled here")
    dense = dequantized_model(quantized, base, torch.float32)
    ours, theirs = (engine_for(m, store, max_adapter_slots=5) for m in (quantized, dense))
    worst = 0.0
    for name in [None, *KINDS]:
        q_logits, d_logits = prefill_logits(ours, name), prefill_logits(theirs, name)
        rel = float((q_logits - d_logits).abs().max() / d_logits.abs().max())
        worst = max(worst, rel)
        assert rel <= QGEMM_REL, (name, rel)
    assert worst > 10 * FP32_BOUND  # the activations are quantized (not the torch path)
    names = [None, *KINDS]
    solo = [generate(engine_for(quantized, store, max_batch=1, max_adapter_slots=5), [greedy_request(n)])[0]
            for n in names]
    assert generate(engine_for(quantized, store, max_adapter_slots=5), [greedy_request(n) for n in names]) == solo


@pytest.mark.parametrize("method", METHODS)
def test_bf16_close_to_the_fp32_truth_for_every_kind(monkeypatch, setup, method):
    base, store = setup
    """bf16 against the fp32 truth (the same quantized model computed in fp32, itself equal to the dequantized
    model): within a few bf16 rounding steps, and never further than the dequantized model run densely in bf16
    (plus one step), the convention of tests/test_adapters_golden.py::test_bf16_close_to_peft."""
    quantized = load_model(base, dtype=torch.bfloat16, quantization=method)
    dense = dequantized_model(quantized, base, torch.bfloat16)
    truth = engine_for(load_model(base, dtype=torch.float32, quantization=method), store, max_adapter_slots=5)
    ours, theirs = (engine_for(m, store, max_adapter_slots=5) for m in (quantized, dense))
    for name in [None, *KINDS]:
        want = prefill_logits(truth, name)
        error = (prefill_logits(ours, name) - want).abs().max()
        dense_error = (prefill_logits(theirs, name) - want).abs().max()
        # bf16 holds 8 mantissa bits: a step of the largest logit is 2^-8 |want|max; ours also rounds the
        # kernels' scales to bf16 (weight_only), which the fp32 truth does not (measured: LoRA over int8-wo 0.66 off
        # against the dense bf16 run's 0.44, logits up to ~40).
        steps = 4 * 2**-8 * want.abs().max()
        # on qgemm bf16 x quantizes to other int8 codes than fp32 x where a value sits near a rounding boundary:
        # measured 0.83 against the dense run's 0.57 (LoRA over int8-wo), 1.40 against 0.57 (int4-wo base, |logit|
        # up to ~19): each is within QGEMM_REL of the dense model, so up to QGEMM_REL more is allowed
        flips = QGEMM_REL * want.abs().max() if quantized.model.lm_head._kernel is not None else 0.0
        assert error <= max(steps, dense_error + 0.25) + flips, (name, float(error), float(dense_error), float(steps))
        assert (want - prefill_logits(truth, None)).abs().max() > 2 * error or name is None, name


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("qgemm", ["0", "1"])
def test_lora_and_dora_merge_into_a_dense_copy_equal_unmerged(monkeypatch, cls, qgemm):
    """merge.dense_linear of AdapterLinear.folded over a weight-only base (DoRA norms from the dequantized weight)
    gives the unmerged adapter's output; the base module is left quantized. On qgemm the unmerged base quantizes
    x per block of 32 and the dense merged copy does not: equal to that error (measured 0.015 on |y| ~ 1)."""
    monkeypatch.setenv(QGEMM_ENV, qgemm)
    torch.manual_seed(2)
    i, o = 128, 64
    base = cls.quantize(torch.randn(o, i) * 0.1, torch.randn(o) * 0.1, torch.float32)
    tol = 1e-5 if base._kernel is None else 0.03
    mapping = BatchMapping()
    layer = AdapterLinear(base, i, o, num_slots=2, max_rank=4, mapping=mapping, dtype=torch.float32, device=CPU)
    a, b = torch.randn(4, i) * 0.1, torch.randn(o, 4) * 0.1
    layer.set_lora(1, a, b, 2.0)
    layer.set_lora(2, a, b, 2.0)
    layer.set_dora(2, torch.rand(o) + 0.5)
    x = torch.randn(3, 1, i)
    for slot in (1, 2):
        mapping.active, mapping.slot_of_row = True, torch.full((3,), slot)
        mapping.slots_present, mapping.uniform_slot, mapping.any_lora = frozenset({slot}), slot, True
        mapping.any_dora = slot == 2
        unmerged = layer(x)
        merged = dense_linear(*layer.folded(slot), CPU, 16)
        torch.testing.assert_close(merged(x), unmerged, rtol=tol, atol=tol)
        assert (unmerged - base(x)).abs().max() > 0.05
    assert layer.base is base and is_weight_only(layer.base)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bf16_packing_follows_the_cpu_kind(monkeypatch, builtin_model_dir, fast_bf16):
    """bf16 linears are oneDNN-packed only where bf16 is native (forced both ways here, so every CPU kind runs both
    paths); packed or not, the logits agree with the unpacked bf16 model within bf16 rounding."""
    monkeypatch.setattr(cpu_features, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert packing_available(CPU, torch.bfloat16) == (fast_bf16 and torch.backends.mkldnn.is_available())
    assert packing_available(CPU, torch.float32) == torch.backends.mkldnn.is_available()
    loaded = load_model(builtin_model_dir, dtype=torch.bfloat16)
    packed = isinstance(loaded.model.model.layers[0].self_attn.q_proj, PackedLinear)
    assert packed == packing_available(CPU, torch.bfloat16)
    if packed:
        plain = load_model(builtin_model_dir, dtype=torch.bfloat16, pack=False)
        pairs = [(loaded.model.model.layers[0].mlp.down_proj, plain.model.model.layers[0].mlp.down_proj),
                 (loaded.model.lm_head, plain.model.lm_head)]
        for ours, theirs in pairs:
            x = torch.randn(2, 1, theirs.in_features, dtype=torch.bfloat16)
            want = theirs(x).float()
            torch.testing.assert_close(ours(x).float(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
            assert ours.weight.dtype == torch.bfloat16
