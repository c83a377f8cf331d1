"""Served AdapterHub bottleneck adapters (houlsby, pfeiffer, parallel) against the library itself.

The oracle is ``adapters`` 1.3.0 in its own venv (tests/adapterhub_oracle.py): it builds a tiny random base
(eager attention) and adapters with non-trivial random weights, saves them in its own format, and computes
logits and greedy tokens by full recomputation (``use_cache=False``). Llama runs the library's native Llama
integration, Qwen2 its plugin interface (hooked layers). Skipped with a reason where the venv is absent.
"""
import pytest
import torch

from adapters.store import AdapterStore
from server.model.loader import load_model
from tests.adapterhub_oracle import SKIP_REASON, oracle_python, run_oracle
from tests.test_adapters_golden import engine_for, generate, greedy_request

pytestmark = pytest.mark.skipif(oracle_python() is None, reason=SKIP_REASON)

PROMPTS = [[5, 72, 101, 108, 108, 111, 32, 119, 111, 114], [5, 33, 60, 99, 7, 41]]
NEW_TOKENS = 8
# (name, library config, overrides): every variant, every activation, odd reduction factors, leave_out
ADAPTERS = [
    ("houlsby", "double_seq_bn", {}),                                          # swish, rf 16: width 8
    ("houlsby-gelu", "double_seq_bn", {"non_linearity": "gelu", "reduction_factor": 3.2}),  # width 39, not 40
    ("pfeiffer", "seq_bn", {}),                                                # relu, rf 16
    ("pfeiffer-tanh", "seq_bn", {"non_linearity": "tanh", "reduction_factor": {"0": 4, "default": 8},
                                 "scaling": 0.5}),
    ("parallel", "par_bn", {}),                                                # relu, rf 2 (width 64), scaling 4
    ("parallel-swish", "par_bn", {"non_linearity": "swish", "reduction_factor": 5, "leave_out": [0]}),
]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapterhub")
    specs = [{"tag": arch, "arch": arch, "seed": i, "prompts": PROMPTS, "new_tokens": NEW_TOKENS,
              "adapters": [{"name": n, "config": c, "kwargs": k} for n, c, k in ADAPTERS]}
             for i, arch in enumerate(("llama", "qwen2"))]
    references = run_oracle(specs, root)
    out = {}
    for arch, reference in references.items():
        store = AdapterStore(root / f"store-{arch}")
        for name, _, _ in ADAPTERS:
            store.add(name, root / arch / name)
        out[arch] = (root / arch / "model", store, reference)
    return out


def prompt_logits(engine, adapter, prompt) -> torch.Tensor:
    """Last-prompt-token logits [V] through the engine (tests.test_adapters_golden.prefill_logits)."""
    from tests.test_adapters_golden import prefill_logits

    return prefill_logits(engine, adapter, prompt)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bottleneck_matches_the_library_fp32(oracle, arch):
    base, store, reference = oracle[arch]
    engine = engine_for(load_model(base, dtype=torch.float32), store)
    for prompt, want in zip(PROMPTS, reference["base"]):
        torch.testing.assert_close(prompt_logits(engine, None, prompt), torch.tensor(want["logits"]), atol=1e-4,
                                   rtol=0)
    for name, _, _ in ADAPTERS:
        for prompt, want in zip(PROMPTS, reference[name]):
            ours = prompt_logits(engine, name, prompt)
            torch.testing.assert_close(ours, torch.tensor(want["logits"]), atol=1e-4, rtol=0, msg=name)
            base_logits = torch.tensor(reference["base"][PROMPTS.index(prompt)]["logits"])
            assert (ours - base_logits).abs().max() > 0.05, f"{name} must visibly change the output"
        got = generate(engine, [greedy_request(name, p, NEW_TOKENS) for p in PROMPTS])
        assert got == [r["tokens"] for r in reference[name]], name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_with_every_variant_equals_solo(oracle, arch):
    base, store, reference = oracle[arch]
    loaded = load_model(base, dtype=torch.float32)
    names = [None] + [n for n, _, _ in ADAPTERS] + [None]
    prompts = [PROMPTS[i % 2][: 5 + i % 4] for i in range(len(names))]
    alone = engine_for(loaded, store, max_batch=1)
    solo = [generate(alone, [greedy_request(n, p, NEW_TOKENS)])[0] for n, p in zip(names, prompts)]
    mixed = generate(engine_for(loaded, store, max_adapter_slots=8), [greedy_request(n, p, NEW_TOKENS)
                                                                      for n, p in zip(names, prompts)])
    assert mixed == solo
    assert len({tuple(t) for t in solo}) > 3
