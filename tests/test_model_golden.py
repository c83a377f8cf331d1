"""Our forward against HF transformers: logits and greedy generation, fp32 and NF4."""
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.model.kv_cache import KVCache
from server.model.llama import StepInputs
from server.model.loader import load_model

ARCHS = ["llama", "mistral", "qwen2"]
PROMPT = [5, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 17, 200, 3]


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """All-token logits [1, T, V] from one prefill into a fresh cache."""
    args = model.args
    t = ids.shape[1]
    cache = KVCache(args.num_layers, 2, args.num_kv_heads, 64, args.head_dim, model.model.embed_tokens.weight.dtype)
    pos = torch.arange(t)[None]
    mask = torch.arange(t)[None, None, None, :] <= pos[:, None, :, None]
    with torch.inference_mode():
        return model(ids, StepInputs(cache, slice(1, 2), pos, pos, t, mask))


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def our_greedy(loaded, prompt: list[int], n: int) -> list[int]:
    engine = Engine(loaded, EngineConfig(max_batch=2, max_seq_len=128))
    request = Request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    engine.generate([request])
    return request.output_token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_logits_and_greedy_match_transformers(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loaded = load_model(path, dtype=torch.float32)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = hf_model(ids).logits
    torch.testing.assert_close(our_logits(loaded.model, ids), expected, atol=1e-4, rtol=0)
    hf_tokens = hf_greedy(hf_model, PROMPT, 32)
    assert len(set(hf_tokens)) > 3, "the tiny model must not be degenerate, or this test proves little"
    assert our_greedy(loaded, PROMPT, 32) == hf_tokens


def test_bf16_logits_close_to_transformers(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    loaded = load_model(path, dtype=torch.bfloat16)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = hf_model(ids).logits.float()
    torch.testing.assert_close(our_logits(loaded.model, ids), expected, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_nf4_matches_transformers_bitsandbytes(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.float32)
    hf_model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config, dtype=torch.float32,
                                                    device_map="cpu").eval()
    loaded = load_model(path, dtype=torch.float32, quantization="nf4")
    assert loaded.weight_bytes < load_model(path, dtype=torch.float32).weight_bytes
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = hf_model(ids).logits
    torch.testing.assert_close(our_logits(loaded.model, ids), expected, atol=1e-4, rtol=0)
    assert our_greedy(loaded, PROMPT, 32) == hf_greedy(hf_model, PROMPT, 32)


def test_int8_runs_close_to_fp32(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    ids = torch.tensor([PROMPT])
    reference = our_logits(load_model(path, dtype=torch.float32).model, ids)
    quantized = our_logits(load_model(path, dtype=torch.float32, quantization="int8").model, ids)
    assert (quantized - reference).abs().max() < 0.25 * reference.abs().max()


def test_nf4_refuses_unaligned_base(tmp_path):
    from tests.tiny_models import make_checkpoint

    path = make_checkpoint(tmp_path / "odd", "llama", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="multiple of 64"):
        load_model(path, quantization="nf4")
