"""`--quantization gguf` (server.model.gguf_grid): a GGUF's Q4_0 / Q4_1 blocks on the int4 kernel, as they are.

* Block decoding equals the gguf package's own dequantization (Q4_0, Q4_1), and the q/k row un-permutation
  inverts llama.cpp's convert_hf_to_gguf `permute`.
* The real default model (SmolLM2-135M-Instruct, Q4_1 decoder linears, Q8_0 tied embedding = lm_head): every
  int4 module's weight and the int8 lm_head's equal the dequantized fp32 checkpoint that transformers' GGUF loader
  wrote (measured max difference below), and computing in fp32 the last-prompt logits stay within
  GGUF_QGEMM_BOUND (qgemm, int8 activations) or GGUF_FP32_BOUND (torch's kernels) of the dense dequantized model
  on the golden prompts, with the argmax and greedy tokens identical.
* `--quantization auto` on CPU: gguf for this model where bf16 is native, none where it is not (both forced).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from server.config import EngineConfig
from server.engine import factory
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model import cpu_features
from server.model.gguf_grid import decode_q4, unpermute_rows
from server.model.weight_only import Int4Linear, Int8Linear
from tests.test_adapters_golden import generate, greedy_request

# fp32 logits of SmolLM2 (|logit| up to ~30) against the dense dequantized model: the kernel computes
# (q - 8) d + (m + 8 d) where the file defines q d + m (one fp32 rounding apart per weight), and sums in its own
# order. Measured on Zen 4 (2026-12-03): weights identical (max difference 0.0), logits 4.5e-5 apart on both
# prompts (|logit| up to 27). In bf16 (the served default) the grid is 0.28 / 0.41 from the fp32 dense logits, the
# argmax unchanged; the resident weights are 171 MiB in bf16 against 513 MiB dense fp32.
GGUF_FP32_BOUND = 2e-4
# On qgemm (the default where it compiles) the weights are still exactly the file's (Q4_1 and the Q8_0 lm_head: max
# difference 0.0), but every GEMM quantizes its input to int8 per block of 32, as llama.cpp's Q8_1 activations do:
# measured on Zen 4 (2026-12-03), fp32 logits 0.69 (plain) and 1.09 (chat) from the dense dequantized model, whose
# largest |logit| is 27 / 23 (2.5-4.7%); argmax and the 4 greedy tokens unchanged. ADAPTER_SERVER_QGEMM=0 is the
# old path (torch's int4 kernel, Q8_0 dense), within GGUF_FP32_BOUND.
GGUF_QGEMM_BOUND = 1.5
PROMPTS = {"plain": "The history of the Roman Empire", "chat": "Write a short poem about the sea."}
NEW = 4  # greedy tokens (the int4 kernel in fp32 is ~20x slower than in bf16: seconds per token here)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_decode_q4_equals_gguf_dequantize(qtype):
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 96)).astype(np.float32)
    blocks = quants.quantize(weight, GGMLQuantizationType[qtype])
    codes, scales, zeros = decode_q4(blocks, qtype, 48, 96)
    module = Int4Linear(codes, scales, zeros, None, torch.float32)
    want = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType[qtype]))
    torch.testing.assert_close(module.weight, want, rtol=0, atol=1e-6)
    assert (want - torch.from_numpy(weight)).abs().max() > 0.01  # it is quantized


@pytest.mark.parametrize("n_head,rows", [(9, 576), (3, 192), (4, 32)])
def test_unpermute_inverts_llama_cpp_permute(n_head, rows):
    def permute(w, n_head):  # convert_hf_to_gguf.LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    x = np.arange(rows * 3).reshape(rows, 3)
    assert (unpermute_rows(torch.from_numpy(permute(x, n_head)), n_head).numpy() == x).all()


@pytest.fixture(scope="module")
def default_dir():
    from server.model.default_model import DefaultModelMissing, ensure_default_model

    try:
        return ensure_default_model()
    except DefaultModelMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_default_model_on_its_q4_1_grid_equals_the_dequantized_model(default_dir, one_thread):
    from server.model.loader import load_model

    grid = load_model(default_dir, dtype=torch.float32, quantization="gguf")
    dense = load_model(default_dir, dtype=torch.float32, pack=False)
    int4 = {n: m for n, m in grid.model.named_modules() if isinstance(m, Int4Linear)}
    assert len(int4) == 7 * grid.model.args.num_layers  # every decoder linear (Q4_1)
    assert isinstance(grid.model.lm_head, Int8Linear)  # the tied Q8_0 token_embd, on its grid
    on_qgemm = grid.model.lm_head._kernel is not None
    torch.testing.assert_close(grid.model.lm_head.weight, dense.model.lm_head.weight, rtol=0, atol=0)
    # Reading a weight back runs the fp32 kernel on an identity (~0.4 s a module; all 210 took 88 s): the first and
    # last layers' seven cover every shape and both un-permuted q and k.
    last = grid.model.args.num_layers - 1
    checked = {n: m for n, m in int4.items() if n.startswith((f"model.layers.0.", f"model.layers.{last}."))}
    assert len(checked) == 14, sorted(checked)
    worst = max((m.weight - dense.model.get_submodule(n).weight).abs().max().item() for n, m in checked.items())
    assert worst <= 1e-6, worst
    assert grid.weight_bytes < 0.6 * dense.weight_bytes
    tok = grid.tokenizer
    for label, text in PROMPTS.items():
        ids = tok(text)["input_ids"]
        outs = []
        for loaded in (grid, dense):
            engine = Engine(loaded, EngineConfig(max_batch=1, max_seq_len=64, max_adapter_slots=1))
            greedy = generate(engine, [greedy_request(None, ids, NEW)])[0] if label == "plain" else None
            outs.append((last_prompt_logits(engine, ids), greedy))
        (g_logits, g_tokens), (d_logits, d_tokens) = outs
        error = (g_logits - d_logits).abs().max().item()
        assert error <= (GGUF_QGEMM_BOUND if on_qgemm else GGUF_FP32_BOUND), (label, error)
        assert g_logits.argmax() == d_logits.argmax(), label
        assert g_tokens == d_tokens, label


def last_prompt_logits(engine, ids):
    request = engine.make_request(ids, SamplingParams(max_tokens=1, temperature=0.0))
    assert engine.adapters.try_acquire(request)
    engine.adapters.set_mapping([request])
    logits = engine.runner.prefill(0, [ids], [request.prefix_len])[0]
    engine.adapters.release(request)
    return logits


@pytest.mark.parametrize("fast_bf16,expected", [(True, "gguf"), (False, "none")])
def test_auto_quantization_on_cpu(monkeypatch, default_dir, fast_bf16, expected):
    monkeypatch.setattr(cpu_features, "cpu_has_fast_bf16", lambda: fast_bf16)
    resolved = factory.resolve(EngineConfig(device="cpu"))
    assert resolved.quantization == expected
    assert resolved.dtype == ("bfloat16" if fast_bf16 else "float32")


def test_gguf_quantization_of_a_checkpoint_is_a_clear_error(builtin_model_dir):
    with pytest.raises(ValueError, match="--quantization gguf"):
        factory.resolve(EngineConfig(device="cpu", model=str(builtin_model_dir), quantization="gguf"))
