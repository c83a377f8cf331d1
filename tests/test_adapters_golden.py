"""Served adapters against PEFT: LoRA (incl. rslora, rank_pattern), IA3 (incl. feed-forward) and prefix,
alone and mixed in one batch, on fp32 and NF4 bases, merged and unmerged."""
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapters.store import AdapterStore
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.model.loader import load_model
from tests.peft_adapters import make_ia3, make_lora, make_prefix

PROMPT = [5, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_checkpoints, tmp_path_factory):
    """(arch, base dir, store, {adapter name: PEFT dir})."""
    arch = request.param
    base = tiny_checkpoints[arch]
    root = tmp_path_factory.mktemp(f"adapters-{arch}")
    paths = {
        "lora": make_lora(base, root / "lora", seed=1),
        "lora-mlp-rslora": make_lora(base, root / "lora2", seed=2, r=4, targets=("gate_proj", "up_proj", "down_proj"),
                                     use_rslora=True, rank_pattern={"down_proj": 8}, alpha_pattern={"up_proj": 3}),
        "ia3": make_ia3(base, root / "ia3", seed=3),
        "prefix": make_prefix(base, root / "prefix", seed=4),
    }
    store = AdapterStore(root / "store")
    for name, path in paths.items():
        store.add(name, path)
    return arch, base, store, paths


def engine_for(loaded, store, **overrides) -> Engine:
    return Engine(loaded, EngineConfig(**{"max_batch": 8, "max_seq_len": 96, "max_adapter_slots": 4,
                                          "merge_threshold": 2.0, **overrides}), store=store)


def prefill_logits(engine: Engine, adapter: str | None) -> torch.Tensor:
    """Last-prompt-token logits [V] through the engine's own admission + prefill path."""
    request = engine.make_request(PROMPT, SamplingParams(max_tokens=1, temperature=0.0), adapter=adapter)
    if adapter:
        engine.adapters.prefetch(request.adapter_version, adapter)
    deadline = time.monotonic() + 30
    while not engine.adapters.try_acquire(request):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    prefix = engine.adapters.prefix_for(request)
    if prefix is not None:
        engine.runner.cache.write_prefix(0, *prefix)
    engine.adapters.set_mapping([request])
    logits = engine.runner.prefill(0, [PROMPT], [request.prefix_len])[0]
    engine.adapters.release(request)
    return logits


def greedy_request(adapter: str | None, prompt=PROMPT, n=NEW_TOKENS) -> Request:
    return Request(list(prompt), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), adapter)


def generate(engine: Engine, requests: list[Request]) -> list[list[int]]:
    prepared = [engine.make_request(r.prompt_token_ids, r.params, adapter=r.adapter) for r in requests]
    engine.generate(prepared)
    return [r.output_token_ids for r in prepared]


def peft_reference(base, path, quantized: bool = False, dtype=torch.float32):
    kwargs = dict(dtype=dtype)
    if quantized:
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    return PeftModel.from_pretrained(model, path).eval()


def peft_greedy(model, n=NEW_TOKENS) -> list[int]:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT),
                             dtype=torch.long), max_new_tokens=n, do_sample=False)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("name", ["lora", "lora-mlp-rslora", "ia3", "prefix"])
def test_each_kind_matches_peft_fp32(setup, name):
    arch, base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32)
    engine = engine_for(loaded, store)
    reference = peft_reference(base, paths[name])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    ours = prefill_logits(engine, name)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert (ours - prefill_logits(engine, None)).abs().max() > 0.05, "the adapter must visibly change the output"
    assert generate(engine, [greedy_request(name)])[0] == peft_greedy(reference)


def test_mixed_batch_gives_each_row_its_solo_output(setup):
    arch, base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32)
    names = [None, "lora", "ia3", "prefix", "lora-mlp-rslora", None, "lora", "prefix"]
    prompts = [PROMPT[: 6 + i] for i in range(len(names))]
    solo = [generate(engine_for(loaded, store, max_batch=1), [greedy_request(n, p)])[0]
            for n, p in zip(names, prompts)]
    mixed = generate(engine_for(loaded, store), [greedy_request(n, p) for n, p in zip(names, prompts)])
    assert mixed == solo
    assert len({tuple(t) for t in solo}) > 3  # adapters lead to different outputs


def test_nf4_base_matches_peft_over_bitsandbytes(setup):
    arch, base, store, paths = setup
    loaded = load_model(base, dtype=torch.float32, quantization="nf4")
    names = [None, "lora", "ia3", "prefix"]
    solo = [generate(engine_for(loaded, store, max_batch=1), [greedy_request(n)])[0] for n in names]
    engine = engine_for(loaded, store)  # built last: the newest engine on a model owns its adapter slots
    assert generate(engine, [greedy_request(n) for n in names]) == solo
    for name in ("lora", "ia3", "prefix"):
        reference = peft_reference(base, paths[name], quantized=True)
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
        torch.testing.assert_close(prefill_logits(engine, name), expected, atol=1e-4, rtol=0)
        assert generate(engine, [greedy_request(name)])[0] == peft_greedy(reference)


def test_bf16_close_to_peft(setup):
    arch, base, store, paths = setup
    loaded = load_model(base, dtype=torch.bfloat16)
    engine = engine_for(loaded, store)
    for name in ("lora", "ia3", "prefix"):
        reference = peft_reference(base, paths[name], dtype=torch.bfloat16)
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1].float()
        # bf16 keeps 8 mantissa bits; on logits of magnitude ~20 one rounding step is 0.06-0.125, and
        # summation order differs from PEFT's (folded LoRA scaling, fused ops): allow a few steps.
        torch.testing.assert_close(prefill_logits(engine, name), expected, atol=0.5, rtol=0.0)
