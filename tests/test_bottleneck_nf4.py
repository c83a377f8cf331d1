"""Served bottleneck adapters over an NF4 base against AdapterHub's library over bitsandbytes (issue 24, point 3).

The adapters and tiny bases are test_bottleneck_golden's (the library's own saves, random non-trivial weights;
the same oracle cache). The library runs in its own venv with bitsandbytes 0.50.2 (`make install-adapterhub`),
loading the base with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_compute_dtype=float32)`` on the CPU, by full recomputation (eager attention).

Bound, as for PEFT over NF4 (tests/test_adapters_golden.assert_matches_peft_over_nf4): on CPUs with AVX512-BF16
(Intel AMX, AMD Zen 4) bitsandbytes repacks each 4-bit weight at its first eval forward and rounds each linear's
input to bf16, so neither side can agree with the other to 1e-4. Both are held to the exact function they
approximate, in fp64: the base with every 4-bit linear replaced by the matrix bitsandbytes multiplies by
(server.model.quant.dequantized_weight, after the repack), the adapter applied by the trainer's module
(adapters.train_bottleneck.load, itself held to the library within 1e-4 in tests/test_train_bottleneck.py).
Ours must be no further from that truth than 3x the library's own distance, plus 1e-4. Greedy tokens must equal
the library's.

Measured on AMD Zen 4 (2026-12-03): both sides are 0.12-0.41 from that truth (these tiny bases have N(0, 0.15)
weights, so activations, and bf16 rounding errors of them, are large), and |ours - library| is 4e-6 to 5.4e-5 on
every adapter, prompt and arch: the server multiplies by bitsandbytes' own NF4 kernel too. So the test also holds
ours to the library directly within DIRECT_BOUND, which one bf16 rounding flip of a linear's input (2^-6, measured
for PEFT) fits in, and which is small against every adapter's own effect (asserted above ADAPTER_EFFECT), so an
ignored adapter cannot pass.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.train_bottleneck import load
from server.model.loader import load_model
from server.model.quant import dequantized_weight
from tests.adapterhub_oracle import SKIP_REASON, library_has, library_logits, oracle_python, run_oracle
from tests.test_adapters_golden import engine_for, generate, greedy_request
from tests.test_bottleneck_golden import ADAPTERS, NEW_TOKENS, PROMPTS, prompt_logits

pytestmark = [pytest.mark.skipif(oracle_python() is None, reason=SKIP_REASON),
              pytest.mark.filterwarnings("ignore::UserWarning")]
ARCHS = ("llama", "qwen2")
NAMES = [n for n, _, _ in ADAPTERS]
DIRECT_BOUND = 0.05   # |ours - library| over NF4, logits; measured <= 5.4e-5 on Zen 4
ADAPTER_EFFECT = 0.5  # each adapter moves the library's NF4 logits by more than this (10x DIRECT_BOUND)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    if not library_has("bitsandbytes"):
        pytest.skip("the AdapterHub venv has no bitsandbytes: run `make install-adapterhub` again (it installs "
                    "bitsandbytes==0.50.2 and accelerate there since issue 24's NF4 test)")
    root = tmp_path_factory.mktemp("adapterhub-nf4")
    # the same specs as test_bottleneck_golden, so the same oracle cache
    specs = [{"tag": arch, "arch": arch, "seed": i, "prompts": PROMPTS, "new_tokens": NEW_TOKENS,
              "adapters": [{"name": n, "config": c, "kwargs": k} for n, c, k in ADAPTERS]}
             for i, arch in enumerate(ARCHS)]
    run_oracle(specs, root)
    return root


def dense_truth_base(base: Path):
    """The fp64 base whose linears are the matrices bitsandbytes' NF4 layers multiply by (after the CPU repack)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        base, attn_implementation="eager", device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)).eval()
    with torch.no_grad():
        quantized(input_ids=torch.tensor([PROMPTS[0]]))  # the first eval forward repacks, as on the library's side
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, module in dense.named_modules():
            if name in layers:
                module.weight.copy_(dequantized_weight(layers[name], torch.float64))
    assert layers, "bitsandbytes quantized nothing"
    return dense


@torch.no_grad()
def truth_logits(dense, adapter: Path | None) -> list[torch.Tensor]:
    model = dense if adapter is None else load(adapter, dense, dtype=torch.float64)
    try:
        return [model(input_ids=torch.tensor([p]), use_cache=False).logits[0, -1] for p in PROMPTS]
    finally:
        if adapter is not None:
            model.adapters.detach()


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_base_matches_the_library_over_bitsandbytes(oracle, arch, tmp_path):
    from adapters.store import AdapterStore

    base = oracle / arch / "model"
    dirs = {n: oracle / arch / n for n in NAMES}
    library = library_logits(base, list(dirs.values()), PROMPTS, tmp_path / "library", quantization="nf4",
                             new_tokens=NEW_TOKENS)
    store = AdapterStore(tmp_path / "store")
    for name, path in dirs.items():
        store.add(name, path)
    engine = engine_for(load_model(base, dtype=torch.float32, quantization="nf4"), store)
    dense = dense_truth_base(base)
    base_truth = truth_logits(dense, None)
    distances = []
    for name in [None, *NAMES]:
        key = "base" if name is None else str(dirs[name])
        truth = base_truth if name is None else truth_logits(dense, dirs[name])
        for i, prompt in enumerate(PROMPTS):
            ours = prompt_logits(engine, name, prompt).double()
            theirs = torch.tensor(library[key][i], dtype=torch.float64)
            ours_error = (ours - truth[i]).abs().max().item()
            library_error = (theirs - truth[i]).abs().max().item()
            distances.append((name, ours_error, library_error, (ours - theirs).abs().max().item()))
            assert ours_error <= 3 * library_error + 1e-4, (
                f"{name}: ours is {ours_error:.3g} from the fp64 truth, the library over bitsandbytes {library_error:.3g}")
            assert (ours - theirs).abs().max() <= DIRECT_BOUND, f"{name}: |ours - library| {distances[-1][3]:.3g}"
            if name is not None:
                effect = (theirs - torch.tensor(library["base"][i], dtype=torch.float64)).abs().max()
                assert effect > ADAPTER_EFFECT, f"{name} must visibly change the output ({effect:.3g})"
        got = generate(engine, [greedy_request(name, p, NEW_TOKENS) for p in PROMPTS])
        assert got == library["tokens"][key], name
    print(f"\n{arch} NF4: (adapter, |ours - truth|, |library - truth|, |ours - library|) max per prompt")
    for row in distances:
        print(f"  {row[0] or 'base':16} {row[1]:.2e} {row[2]:.2e} {row[3]:.2e}")
