"""The CUDA path: NF4 vs transformers + bitsandbytes, adapters vs PEFT, and the Triton kernels natively.

Every test here is marked `cuda` and skipped without a CUDA device (`pytest -m cuda`;
scripts/gpu_check.sh runs them). The CPU versions of the golden tests are
tests/test_model_golden.py and tests/test_adapters_golden.py, whose helpers these reuse.

Tolerances: fp32 on CUDA differs from the CPU only by summation order (TF32 stays off,
torch's default for matmul), so logits agree to ~1e-4; a little more is allowed because
attention kernels differ between our SDPA call and transformers'.
"""
import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import Engine
from server.model import adapter_ops
from server.model.adapter_ops import lora_delta_reference
from server.model.loader import load_model
from tests.test_adapters_golden import PROMPT, generate, greedy_request, prefill_logits, setup  # noqa: F401

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = "cuda"
ATOL = 2e-4


def cuda_engine(loaded, store=None, **overrides) -> Engine:
    config = {"max_batch": 8, "max_seq_len": 96, "max_adapter_slots": 4, "merge_threshold": 2.0, "device": CUDA,
              **overrides}
    return Engine(loaded, EngineConfig(**config), device=CUDA, store=store)


def hf_model(base, quantized: bool, adapter=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(dtype=torch.float32, device_map=CUDA)
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def hf_last_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT], device=CUDA)).logits[0, -1]


def cuda_greedy(model, n=16) -> list[int]:
    """Greedy tokens of a transformers/PEFT model on CUDA (the CPU helpers build CPU inputs)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([PROMPT], device=CUDA)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_nf4_on_cuda_matches_transformers_bitsandbytes(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    reference = hf_model(path, quantized=True)
    loaded = load_model(path, dtype=torch.float32, quantization="nf4", device=CUDA)
    engine = cuda_engine(loaded)
    torch.testing.assert_close(prefill_logits(engine, None), hf_last_logits(reference), atol=ATOL, rtol=0)
    tokens = generate(engine, [greedy_request(None)])[0]
    assert tokens == cuda_greedy(reference)
    assert len(set(tokens)) > 3


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_adapters_on_cuda_match_peft(setup, quantized):  # noqa: F811 - the fixture of test_adapters_golden
    arch, base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32, quantization="nf4" if quantized else "none", device=CUDA)
    engine = cuda_engine(loaded, store)
    for name in ("lora", "lora-mlp-rslora", "ia3", "prefix"):
        reference = hf_model(base, quantized, adapter=paths[name])
        torch.testing.assert_close(prefill_logits(engine, name), hf_last_logits(reference), atol=ATOL, rtol=0)
        assert generate(engine, [greedy_request(name)])[0] == cuda_greedy(reference)
        del reference
        torch.cuda.empty_cache()


def test_mixed_batch_on_cuda_gives_each_row_its_solo_output(setup):  # noqa: F811
    """Mixed rows go through the Triton kernels; one row alone takes the plain-matmul path."""
    arch, base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32, device=CUDA)
    names = [None, "lora", "ia3", "prefix", "lora-mlp-rslora", None, "lora", "prefix"]
    prompts = [PROMPT[: 6 + i] for i in range(len(names))]
    solo = [generate(cuda_engine(loaded, store, max_batch=1), [greedy_request(n, p)])[0]
            for n, p in zip(names, prompts)]
    mixed = generate(cuda_engine(loaded, store), [greedy_request(n, p) for n, p in zip(names, prompts)])
    assert mixed == solo
    assert adapter_ops._triton_ops(), "on CUDA the Triton kernels must be in use"


# --- the Triton kernels, compiled (tests/test_triton_ops.py runs the same code in the interpreter) ---

SLOT_RANK = [0, 16, 1, 8, 0, 16, 4]
WIDTHS = {"q": (576, 576), "kv": (576, 192), "gate_up": (576, 1536), "down": (1536, 576), "wide": (4096, 14336)}
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=0.05, rtol=0.01),
             torch.float16: dict(atol=0.01, rtol=0.002)}


def cuda_slots(in_features, out_features, dtype):
    g = torch.Generator().manual_seed(in_features + out_features)
    a = torch.randn(len(SLOT_RANK), 16, in_features, generator=g) / in_features ** 0.5
    b = torch.randn(len(SLOT_RANK), 16, out_features, generator=g) / 4
    clean_a, clean_b = a.clone(), b.clone()
    for s, r in enumerate(SLOT_RANK):  # garbage past each slot's rank must never be read
        clean_a[s, r:], clean_b[s, r:] = 0, 0
    return [t.to(dtype) for t in (a, b, clean_a, clean_b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("n, t", [(64, 1), (3, 1), (6, 37)], ids=["decode64", "decode3", "prefill"])
def test_triton_lora_on_cuda_matches_reference(dtype, width, n, t):
    assert adapter_ops._triton_ops(), "triton must be importable on a CUDA machine (torch brings it)"
    in_features, out_features = WIDTHS[width]
    a, b, clean_a, clean_b = cuda_slots(in_features, out_features, dtype)
    g = torch.Generator().manual_seed(n * t)
    slot_of_row = torch.randint(0, len(SLOT_RANK), (n,), generator=g)
    slot_of_row[0], slot_of_row[-1] = 2, 0  # never uniform
    x = torch.randn(n, t, in_features, generator=g).to(dtype)
    y = torch.randn(n, t, out_features, generator=g).to(dtype)
    expected = y.double() + lora_delta_reference(x.double(), clean_a.double(), clean_b.double(), slot_of_row)
    args = [v.to(CUDA) for v in (y.clone(), x, a, b, slot_of_row)]
    out = adapter_ops.add_lora(*args, 16, slot_rank=torch.tensor(SLOT_RANK, device=CUDA)).cpu()
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
    plain = [s for s in range(n) if SLOT_RANK[int(slot_of_row[s])] == 0]
    assert torch.equal(out[plain], y[plain])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t", [1, 29])
def test_triton_row_scale_on_cuda_is_bit_exact(dtype, t):
    scales = (torch.rand(7, 5120, device=CUDA) + 0.5).to(dtype)
    y = torch.randn(64, t, 5120, device=CUDA).to(dtype)
    rows = torch.randint(0, 7, (64,), device=CUDA)
    out = adapter_ops.row_scale(y, scales, rows)
    assert torch.equal(out, y * scales.index_select(0, rows)[:, None, :])


def test_triton_decode_is_not_slower_than_gather_bmm():
    """Batch 64, 64 distinct rank-16 slots, hidden 4096: the kernel should beat gathering the factors."""
    s, i, o = 65, 4096, 4096
    a = torch.randn(s, 16, i, device=CUDA, dtype=torch.bfloat16)
    b = torch.randn(s, 16, o, device=CUDA, dtype=torch.bfloat16)
    x = torch.randn(64, 1, i, device=CUDA, dtype=torch.bfloat16)
    y = torch.randn(64, 1, o, device=CUDA, dtype=torch.bfloat16)
    rows = torch.arange(1, 65, device=CUDA)
    ranks = torch.full((s,), 16, device=CUDA)

    def gather_bmm():
        return y + torch.bmm(torch.bmm(x, a.index_select(0, rows).transpose(1, 2)), b.index_select(0, rows))

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 50

    kernel = timed(lambda: adapter_ops.add_lora(y.clone(), x, a, b, rows, 16, slot_rank=ranks))
    baseline = timed(gather_bmm)
    print(f"\nLoRA decode, batch 64, 64 slots, r=16, 4096x4096 bf16: triton {kernel * 1e3:.1f} us, "
          f"gather+bmm {baseline * 1e3:.1f} us")
    assert kernel <= baseline * 1.5
