"""MAM (and UniPELT) over an NF4 base against AdapterHub's library over bitsandbytes (issue 24, points 2 and 3).

As tests/test_bottleneck_nf4.py does for the bottleneck kinds: the adapters are the golden tests' (the library's
own saves, through ``adapterctl convert``; the same oracle cache), the library loads the base with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=float32)`` on the CPU
(scripts/adapterhub_logits.py, full recomputation, eager attention), and we serve the same checkpoint with
``quantization="nf4"`` (bitsandbytes' own layers).

Bound: on AVX512-BF16 CPUs bitsandbytes rounds each 4-bit linear's input to bf16, so neither side agrees with the
other to 1e-4. Both are held to the exact function they approximate: the library itself, in fp32, over a dense base
whose linears are the matrices bitsandbytes multiplies by (test_bottleneck_nf4.dense_truth_base, saved as a
checkpoint). Ours must be no further from it than 3x the library's own distance plus 1e-4, within DIRECT_BOUND of
the library over bitsandbytes, and greedy tokens equal the library's. The prefix part of these adapters is not
quantized on either side (K/V computed once from the adapter's fp32 weights).

UniPELT runs with the server's per-token gate on the library's side too (scripts/adapterhub_oracle.py
``per_token_gates``, ``"gate": "token"`` in the logits spec).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.convert import convert_dir
from adapters.store import AdapterStore
from server.model.loader import load_model
from tests.adapterhub_oracle import SKIP_REASON, library_has, library_logits, oracle_python, run_oracle
from tests.test_adapters_golden import engine_for, generate, greedy_request, prefill_logits
from tests.test_bottleneck_nf4 import DIRECT_BOUND, dense_truth_base

pytestmark = [pytest.mark.skipif(oracle_python() is None, reason=SKIP_REASON),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _golden(kind: str):
    from tests import test_mam, test_unipelt
    return {"mam": test_mam, "unipelt": test_unipelt}[kind]


@pytest.mark.parametrize("kind", ["mam", "unipelt"])
def test_nf4_base_matches_the_library_over_bitsandbytes(kind, tmp_path):
    if not library_has("bitsandbytes"):
        pytest.skip("the AdapterHub venv has no bitsandbytes: run `make install-adapterhub` again")
    module = _golden(kind)
    prompts, new_tokens, pickled = module.PROMPTS, module.NEW_TOKENS, kind  # the library pickles both kinds
    # the same specs as the golden test, so the same oracle cache
    specs = [{"tag": "llama", "arch": "llama", "seed": 3, "prompts": prompts, "new_tokens": new_tokens,
              "adapters": [{"name": n, "config": c, "kwargs": k, "pickle": c == pickled}
                           for n, c, k in module.ADAPTERS]}]
    run_oracle(specs, tmp_path / "oracle")
    root = tmp_path / "oracle" / "llama"
    names = [n for n, c, _ in module.ADAPTERS if c == pickled]
    dirs = {n: root / n for n in names}
    for path in dirs.values():
        convert_dir(path, remove_pickle=True)
    gate = "token" if kind == "unipelt" else None
    library = library_logits(root / "model", list(dirs.values()), prompts, tmp_path / "library", quantization="nf4",
                             new_tokens=new_tokens, gate=gate)
    dense = dense_truth_base(root / "model")
    dense.float().save_pretrained(tmp_path / "dense")
    truth = library_logits(tmp_path / "dense", list(dirs.values()), prompts, tmp_path / "truth", gate=gate)
    store = AdapterStore(tmp_path / "store")
    for name, path in dirs.items():
        store.add(name, path)
    engine = engine_for(load_model(root / "model", dtype=torch.float32, quantization="nf4"), store)
    rows = []
    for name in [None, *names]:
        key = "base" if name is None else str(dirs[name])
        for i, prompt in enumerate(prompts):
            ours = prefill_logits(engine, name, prompt).double()
            theirs = torch.tensor(library[key][i], dtype=torch.float64)
            want = torch.tensor(truth[key][i], dtype=torch.float64)
            ours_error, library_error = (ours - want).abs().max().item(), (theirs - want).abs().max().item()
            rows.append((name, ours_error, library_error, (ours - theirs).abs().max().item()))
            assert ours_error <= 3 * library_error + 1e-4, (
                f"{name}: ours is {ours_error:.3g} from the truth, the library over bitsandbytes {library_error:.3g}")
            assert rows[-1][3] <= DIRECT_BOUND, f"{name}: |ours - library| {rows[-1][3]:.3g}"
            if name is not None:
                effect = (theirs - torch.tensor(library["base"][i], dtype=torch.float64)).abs().max()
                assert effect > 10 * DIRECT_BOUND, f"{name} must visibly change the output ({effect:.3g})"
        got = generate(engine, [greedy_request(name, p, new_tokens) for p in prompts])
        assert got == library["tokens"][key], name
    print(f"\n{kind} over NF4: (adapter, |ours - truth|, |library - truth|, |ours - library|) max per prompt")
    for row in rows:
        print(f"  {row[0] or 'base':18} {row[1]:.2e} {row[2]:.2e} {row[3]:.2e}")
