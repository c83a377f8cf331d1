"""The Triton adapter kernels against the reference op, on CPU through Triton's interpreter.

Real layer widths (hidden 576 with GQA: q/o 576, k/v 192, MLP 1536), slots of ranks 1, 8 and 16
in one batch next to slot-0 rows and a slot with no LoRA in the layer, decode (T = 1) and prefill
(T > 1), fp32/bf16/fp16. Skipped when triton is not installed (`pip install -e ".[triton]"`).

TRITON_INTERPRET=1 is set only while a private copy of server.model.triton_ops is built and while
these tests run, so server.model.triton_ops itself (tests/test_cuda.py) stays compiled. It cannot
be set before triton is imported: bitsandbytes imports triton, and other test modules import
bitsandbytes first. That works because the kernels call only builtins of triton.language (its
@jit helpers such as tl.sum, made at import, would stay compiled) and their own @jit helpers.
The interpreter cannot multiply bf16 and truncates fp32 -> bf16, so for bf16 the kernels multiply
bf16 values in fp32 (the same products) and round to nearest even on integer bits
(triton_ops._cast); the compiled bf16 path is checked by tests/test_cuda.py.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from server.model import adapter_ops
from server.model.adapter_ops import lora_delta_reference

pytest.importorskip("triton")

SLOTS, RMAX = 6, 16
SLOT_RANK = [0, 16, 1, 8, 0, 16]  # slot 4 holds no LoRA in this layer; slot 0 is the identity
WIDTHS = {"q": (576, 576), "kv": (576, 192), "o": (576, 576), "gate_up": (576, 1536), "down": (1536, 576)}
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=0.1, rtol=0.02),
             torch.float16: dict(atol=0.02, rtol=0.005)}


def load_copy(name: str):
    """A fresh copy of server/model/triton_ops.py under another module name."""
    spec = importlib.util.spec_from_file_location(name, Path(adapter_ops.__file__).with_name("triton_ops.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def interpreted():
    """server/model/triton_ops.py loaded afresh under TRITON_INTERPRET=1; the variable set while tests run."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield load_copy("_triton_ops_interpreted")
    finally:
        sys.modules.pop("_triton_ops_interpreted", None)
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def make_slots(in_features, out_features, dtype, garbage=True):
    """Slot tensors with each slot's rank from SLOT_RANK, and the same with the padding zeroed (for the reference)."""
    g = torch.Generator().manual_seed(in_features * 7 + out_features)
    a = torch.randn(SLOTS, RMAX, in_features, generator=g) / in_features ** 0.5
    b = torch.randn(SLOTS, RMAX, out_features, generator=g) / 4
    clean_a, clean_b = a.clone(), b.clone()
    for s, r in enumerate(SLOT_RANK):  # garbage past each rank (all of slot 0) must never be read
        clean_a[s, r:], clean_b[s, r:] = 0, 0
    if not garbage:
        a, b = clean_a.clone(), clean_b.clone()
    return (a.to(dtype), b.to(dtype)), (clean_a.to(dtype), clean_b.to(dtype)), torch.tensor(SLOT_RANK)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("rows, t", [([1, 2, 3, 0, 5, 1, 4, 3, 2], 1), ([3, 0, 1, 2], 5)], ids=["decode", "prefill"])
def test_lora_matches_reference(interpreted, dtype, width, rows, t):
    in_features, out_features = WIDTHS[width]
    (a, b), (clean_a, clean_b), slot_rank = make_slots(in_features, out_features, dtype)
    g = torch.Generator().manual_seed(len(rows) * t)
    x = torch.randn(len(rows), t, in_features, generator=g).to(dtype)
    y = torch.randn(len(rows), t, out_features, generator=g).to(dtype)
    slot_of_row = torch.tensor(rows)
    delta = lora_delta_reference(x.float(), clean_a.float(), clean_b.float(), slot_of_row)
    expected = y.float() + delta
    out = interpreted.add_lora(y.clone(), x, a, b, slot_of_row, RMAX, slot_rank)
    assert out.dtype == dtype and out.shape == y.shape
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])
    untouched = [n for n, s in enumerate(rows) if SLOT_RANK[s] == 0]
    assert torch.equal(out[untouched], y[untouched]), "rows without LoRA in this layer must not change"
    if dtype != torch.float32:  # no less exact than the plain-torch path in the same dtype
        torch_path = adapter_ops.add_lora(y.clone(), x, clean_a, clean_b, slot_of_row, RMAX)
        assert (out.float() - expected).abs().max() <= (torch_path.float() - expected).abs().max() * 1.5 + 1e-3


@pytest.mark.parametrize("rank", [1, 8])
def test_lora_rank_cap_and_default_slot_ranks(interpreted, rank):
    """`rank` below Rmax caps every slot; slot_rank=None means `rank` for every slot but 0."""
    (a, b), _, _ = make_slots(576, 192, torch.float32, garbage=False)
    x, y = torch.randn(5, 1, 576), torch.randn(5, 1, 192)
    slot_of_row = torch.tensor([1, 0, 5, 1, 3])
    capped_a, capped_b = a.clone(), b.clone()
    capped_a[:, rank:], capped_b[:, rank:] = 0, 0
    expected = y + lora_delta_reference(x, capped_a, capped_b, slot_of_row)
    torch.testing.assert_close(interpreted.add_lora(y.clone(), x, a, b, slot_of_row, rank), expected,
                               atol=1e-4, rtol=1e-5)


def test_lora_many_rows_one_slot_and_tile_boundaries(interpreted):
    """More tokens than one tile (BLOCK_M 64 past 256 tokens), slots of uneven counts, strided x."""
    (a, b), (clean_a, clean_b), slot_rank = make_slots(576, 192, torch.float32)
    rows = [1] * 20 + [3] * 3 + [0] * 2 + [2] * 9
    x = torch.randn(len(rows), 8, 1152)[:, :, ::2]  # non-contiguous input
    y = torch.randn(len(rows), 8, 192)
    slot_of_row = torch.tensor(rows)[torch.randperm(len(rows), generator=torch.Generator().manual_seed(3))]
    expected = y + lora_delta_reference(x, clean_a, clean_b, slot_of_row)
    torch.testing.assert_close(interpreted.add_lora(y.clone(), x, a, b, slot_of_row, RMAX, slot_rank), expected,
                               atol=1e-4, rtol=1e-5)


def test_tile_table_is_reused_within_a_forward_and_rebuilt_after(interpreted):
    slot_of_row = torch.tensor([2, 1, 2, 0])
    first = interpreted._tiles(slot_of_row, 1, SLOTS, 16)
    assert interpreted._tiles(slot_of_row, 1, SLOTS, 16) is first
    assert first.order.tolist() == [3, 1, 0, 2] and first.counts.tolist() == [1, 1, 2, 0, 0, 0]
    slot_of_row[3] = 5  # changed in place: rebuilt
    assert interpreted._tiles(slot_of_row, 1, SLOTS, 16).counts.tolist() == [0, 1, 2, 0, 0, 1]


def test_tile_table_of_an_inference_tensor(interpreted):
    """The engine's slot_of_row is made in inference mode: no version counter, cached by identity."""
    with torch.inference_mode():
        slot_of_row = torch.tensor([1, 1, 0])
    tiles = interpreted._tiles(slot_of_row, 2, SLOTS, 16)
    assert interpreted._tiles(slot_of_row, 2, SLOTS, 16) is tiles
    assert tiles.order.tolist() == [4, 5, 0, 1, 2, 3] and tiles.tile_end.tolist() == [1, 2, 2, 2, 2, 2]


def test_engine_mixed_batch_through_the_kernels(interpreted, tiny_checkpoints, tmp_path, monkeypatch):
    """The engine with its layers routed to the kernels (as on CUDA) gives each row its solo output."""
    from adapters.store import AdapterStore
    from server.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams
    from server.model import adapter_layers
    from server.model.loader import load_model
    from tests.peft_adapters import make_ia3, make_lora

    base = tiny_checkpoints["llama"]
    store = AdapterStore(tmp_path / "store")
    store.add("lora", make_lora(base, tmp_path / "lora", seed=1))
    store.add("lora-mlp", make_lora(base, tmp_path / "lora2", seed=2, r=4, targets=("gate_proj", "down_proj"),
                                    rank_pattern={"down_proj": 8}))
    store.add("ia3", make_ia3(base, tmp_path / "ia3", seed=3))
    loaded = load_model(base, dtype=torch.float32)
    names = [None, "lora", "ia3", "lora-mlp", "lora"]
    prompts = [[5, 72, 101, 108, 108, 111, 32, 119][: 4 + i] for i in range(len(names))]

    def run(rows, max_batch):
        engine = Engine(loaded, EngineConfig(max_batch=max_batch, max_seq_len=32, max_adapter_slots=4,
                                             merge_threshold=2.0), store=store)
        # adapters resident first, so every row is admitted in the first step: one padded [B, T] prefill with
        # mixed slots (rows admitted while others decode run token by token in the step's one flat forward)
        engine.generate([engine.make_request([5], SamplingParams(max_tokens=1, temperature=0.0), adapter=name)
                         for name in sorted({names[i] for i in rows} - {None})])
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        requests = [engine.make_request(prompts[i], params, adapter=names[i]) for i in rows]
        engine.generate(requests)
        return [r.output_token_ids for r in requests]

    solo = [run([i], 1)[0] for i in range(len(names))]
    calls = []

    def add_lora(y, x, a, b, slots, rank, uniform_slot=None, slot_rank=None):
        if uniform_slot is not None or slots.numel() == 1:
            return adapter_ops.add_lora(y, x, a, b, slots, rank, uniform_slot, slot_rank)
        calls.append(x.shape[1])
        return interpreted.add_lora(y, x, a, b, slots, rank, slot_rank)

    def row_scale(y, scales, slots):
        calls.append("ia3")
        return interpreted.row_scale(y, scales, slots) if slots.numel() > 1 else y * scales[int(slots[0])]

    monkeypatch.setattr(adapter_layers, "add_lora", add_lora)
    monkeypatch.setattr(adapter_layers, "row_scale", row_scale)
    assert run(range(len(names)), len(names)) == solo
    assert 1 in calls and any(c not in (1, "ia3") for c in calls) and "ia3" in calls  # decode, prefill, IA3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t", [1, 3])
def test_row_scale_is_bit_exact(interpreted, dtype, t):
    scales = (torch.rand(SLOTS, 1536) + 0.5).to(dtype)
    scales[0] = 1
    y = torch.randn(7, t, 1536).to(dtype)
    rows = torch.tensor([0, 4, 4, 1, 5, 0, 2])
    expected = adapter_ops.row_scale(y, scales, rows)
    out = interpreted.row_scale(y, scales, rows)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_module_imports_without_triton(monkeypatch):
    """The CPU install has no triton: the module still imports and says it is unavailable."""
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    try:
        assert not load_copy("_triton_ops_absent").available()
    finally:
        sys.modules.pop("_triton_ops_absent", None)
