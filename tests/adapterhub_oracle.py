"""Run the AdapterHub oracle (scripts/adapterhub_oracle.py) in its own venv, outside the repository root.

The venv is `.venv-adapterhub` (``make install-adapterhub``, scripts/adapterhub_setup.sh), or the python named
by ADAPTERHUB_PYTHON. Our package ``adapters`` shadows the library's, so the oracle runs as a subprocess whose
working directory is a temp dir and whose sys.path never holds the repository root (``python -I``: isolated
mode ignores PYTHONPATH and the user site, and puts only the script's own directory first).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from server.model import builtin

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "adapterhub_oracle.py"


def oracle_python() -> Path | None:
    path = Path(os.environ.get("ADAPTERHUB_PYTHON") or ROOT / ".venv-adapterhub" / "bin" / "python")
    return path if path.is_file() else None


SKIP_REASON = ("the AdapterHub oracle venv is absent: run `make install-adapterhub` (adapters==1.3.0, "
               "transformers==4.57.6, torch==2.13.0 in .venv-adapterhub) or set ADAPTERHUB_PYTHON")


def run_oracle(specs: list[dict], out: Path) -> dict[str, dict]:
    """Build each spec's tiny base and adapters with the library under ``out / tag`` (one process) and return
    {tag: reference} (reference: {"base" | adapter name: [{"logits": [V], "tokens": [n]} per prompt]}). Each
    base dir gets our built-in tokenizer files, so the server loads it like any checkpoint."""
    python = oracle_python()
    assert python is not None, SKIP_REASON
    tokenizer = builtin.build_tokenizer()
    specs = [{"vocab_size": tokenizer.get_vocab_size(), **spec} for spec in specs]
    # The library's output depends only on the specs, the script and the venv: cached next to the venv (git
    # ignores it), so a rerun pays our side only (the oracle takes ~1 minute on 2 busy cores).
    key = hashlib.sha256(json.dumps(specs, sort_keys=True).encode() + SCRIPT.read_bytes()
                         + str(python.resolve()).encode()).hexdigest()[:16]
    cache = python.parent.parent / "oracle-cache" / key
    if not (cache / "done").is_file():
        _run(python, specs, cache)
        (cache / "done").write_text("")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(cache, out)
    return {spec["tag"]: json.loads((out / spec["tag"] / "reference.json").read_text()) for spec in specs}


def _run(python: Path, specs: list[dict], out: Path) -> None:
    tokenizer = builtin.build_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "oracle-cwd"
    work.mkdir(exist_ok=True)
    script = work / SCRIPT.name  # a copy: the script's directory is what -I puts on sys.path
    shutil.copy(SCRIPT, script)
    (work / "spec.json").write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(python), "-I", str(script), "spec.json", str(out)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"the AdapterHub oracle failed:\n{done.stderr[-4000:]}")
    configs = builtin._configs(tokenizer)
    for spec in specs:
        model = out / spec["tag"] / "model"
        tokenizer.save(str(model / "tokenizer.json"))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            (model / name).write_text(json.dumps(configs[name]))
    shutil.rmtree(work)


LOGITS_SCRIPT = ROOT / "scripts" / "adapterhub_logits.py"


def library_has(module: str) -> bool:
    """Whether the oracle venv can import ``module`` (bitsandbytes for the NF4 tests: `make install-adapterhub`
    installs it since issue 24's NF4 test; an older venv lacks it)."""
    python = oracle_python()
    return python is not None and subprocess.run([str(python), "-I", "-c", f"import {module}"], cwd="/",
                                                 capture_output=True, timeout=120).returncode == 0


def library_logits(base: Path, adapter_dirs: list[Path], prompts: list[list[int]], work: Path,
                   quantization: str = "none", new_tokens: int = 0, gate: str | None = None) -> dict:
    """The library's last-prompt-token logits for ``base`` and each saved adapter dir (scripts/adapterhub_logits.py,
    not cached: the adapters are made by the test): {"base": [[V] per prompt], str(dir): [...]}, and with
    ``new_tokens`` {"tokens": {"base" | str(dir): [[greedy tokens] per prompt]}} (full recomputation). ``gate="token"``:
    UniPELT's gates per token (the oracle script's ``per_token_gates``, the server's semantics)."""
    python = oracle_python()
    assert python is not None, SKIP_REASON
    work.mkdir(parents=True, exist_ok=True)
    script = work / LOGITS_SCRIPT.name
    shutil.copy(LOGITS_SCRIPT, script)
    shutil.copy(SCRIPT, work / SCRIPT.name)  # per_token_gates, imported by the logits script with gate="token"
    spec = {"base": str(base), "quantization": quantization, "prompts": prompts,
            "adapters": [str(d) for d in adapter_dirs], "new_tokens": new_tokens, "gate": gate}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(python), "-I", str(script), "spec.json", "out.json"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"the AdapterHub library failed:\n{done.stderr[-4000:]}")
    return json.loads((work / "out.json").read_text())


def union_oracle(root: Path, adapters: list[tuple[str, str, dict]], pickled: str, prompts, new_tokens: int):
    """The oracle's Llama (seed 3) with `adapters` [(name, library config, kwargs)], stored the way a user would:
    adapters of config `pickled` (MAM, UniPELT: the library saves unions only as pytorch_adapter.bin) converted by
    `adapterctl convert` first. -> (base model dir, AdapterStore holding them all, the oracle's references).
    Call only when oracle_python() is not None."""
    from adapters.convert import convert_dir
    from adapters.store import AdapterStore

    specs = [{"tag": "llama", "arch": "llama", "seed": 3, "prompts": prompts, "new_tokens": new_tokens,
              "adapters": [{"name": n, "config": c, "kwargs": k, "pickle": c == pickled} for n, c, k in adapters]}]
    reference = run_oracle(specs, root)["llama"]
    store = AdapterStore(root / "store")
    for name, config, _ in adapters:
        if config == pickled:
            convert_dir(root / "llama" / name, remove_pickle=True)  # the user's step: the library writes a pickle
        store.add(name, root / "llama" / name)
    return root / "llama" / "model", store, reference
