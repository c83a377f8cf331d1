"""The trainer's bottleneck kinds (``adapterctl train --kind houlsby|pfeiffer|parallel``, adapters/train_bottleneck.py).

Our own modules, saved in AdapterHub's format. A short run on the built-in tiny model per kind; its file
- is exactly the library's format and passes the server's upload validation;
- is served by the engine with the training module's logits (fp32, 1e-4);
- loads into the library itself (adapters 1.3.0 in its own venv, tests/adapterhub_oracle.py) with the training
  module's logits (fp32, 1e-4); skipped with a reason where that venv is absent.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters.format import BaseSpec, load_adapter
from adapters.kinds.bottleneck import KEY_RE, BottleneckAdapter
from adapters.store import AdapterStore
from adapters.train import TrainConfig, TrainError, train_adapter, upload_adapter
from adapters.train_bottleneck import LIBRARY_CONFIGS, library_config, load
from server.model.loader import load_model
from tests.adapterhub_oracle import SKIP_REASON, library_logits, oracle_python
from tests.test_adapters_golden import engine_for
from tests.test_bottleneck_golden import prompt_logits
from tests.test_train import BUILTIN, THREADS, task_rows, write_jsonl

KINDS = tuple(LIBRARY_CONFIGS)
# Enough steps to move the tiny random model's logits far past the tolerance; the library's defaults otherwise,
# except parallel's width (hidden 256 // 2 = 128 is above a default server's --max-lora-rank 64).
HYPER = {"houlsby": dict(lr=1e-2, steps=10), "pfeiffer": dict(lr=1e-2, steps=10),
         "parallel": dict(lr=1e-2, steps=10, reduction_factor=8)}
PROMPTS = [[5, 72, 101, 108, 108, 111, 32, 119, 111, 114], [5, 33, 60, 99, 7, 41]]


def config(kind: str, data: Path, out: Path, cache: Path, **overrides) -> TrainConfig:
    values = dict(HYPER[kind], base=BUILTIN, eval_fraction=0.0, progress=False, threads=THREADS, device="cpu")
    values.update(overrides)
    return TrainConfig(kind=kind, data=data, out=out, cache_dir=cache, **values)


@pytest.fixture(scope="module")
def cache(builtin_model_dir) -> Path:
    return builtin_model_dir.parent.parent


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """kind -> TrainResult, each kind trained once per module."""
    root = tmp_path_factory.mktemp("trained")
    data = write_jsonl(root / "task.jsonl", task_rows())
    return {kind: train_adapter(config(kind, data, root / f"shout-{kind}", cache)) for kind in KINDS}


def hf_base(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


@torch.no_grad()
def module_logits(model) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([p]), use_cache=False).logits[0, -1].float() for p in PROMPTS]


@pytest.mark.parametrize("kind", KINDS)
def test_trains_and_writes_the_library_format(kind, trained, builtin_model_dir):
    from transformers import AutoConfig

    result = trained[kind]
    assert result.steps == HYPER[kind]["steps"] and result.train_loss_end < result.train_loss_start
    assert sorted(p.name for p in result.out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    saved = json.loads((result.out / "adapter_config.json").read_text())
    assert sorted(saved) == ["config", "hidden_size", "model_class", "model_name", "model_type", "name", "version"]
    assert saved["config"] == library_config(kind, HYPER[kind].get("reduction_factor"))
    assert (saved["hidden_size"], saved["model_class"], saved["model_type"], saved["name"]) == (
        256, "LlamaForCausalLM", "llama", f"shout-{kind}")
    with safe_open(str(result.out / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
    places = {"houlsby": {"attention", "output"}, "pfeiffer": {"output"}, "parallel": {"output"}}[kind]
    assert len(keys) == 4 * 4 * len(places)  # 4 layers, down/up weight/bias
    assert all(KEY_RE.fullmatch(k) and KEY_RE.fullmatch(k)["place"] in places and
               KEY_RE.fullmatch(k)["name"] == f"shout-{kind}" for k in keys)
    spec = BaseSpec.from_hf_config(AutoConfig.from_pretrained(builtin_model_dir), BUILTIN)
    served = load_adapter(result.out, spec, max_rank=64)  # the server's upload validation
    assert isinstance(served, BottleneckAdapter) and served.variant == kind
    assert served.rank == {"houlsby": 16, "pfeiffer": 16, "parallel": 32}[kind]  # int(256 // reduction_factor)


def test_served_equals_the_training_module(trained, builtin_model_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    for kind in KINDS:
        store.add(kind, trained[kind].out)
    engine = engine_for(load_model(builtin_model_dir, dtype=torch.float32), store)
    base_logits = module_logits(hf_base(builtin_model_dir))
    for kind in KINDS:
        ours = module_logits(load(trained[kind].out, hf_base(builtin_model_dir)))
        for prompt, want, base in zip(PROMPTS, ours, base_logits):
            assert (want - base).abs().max() > 0.05, f"{kind}: the trained adapter must visibly change the output"
            torch.testing.assert_close(prompt_logits(engine, kind, prompt), want, atol=1e-4, rtol=0, msg=kind)


@pytest.mark.skipif(oracle_python() is None, reason=SKIP_REASON)
def test_the_library_loads_it_with_the_training_modules_logits(trained, builtin_model_dir, tmp_path):
    dirs = [trained[kind].out for kind in KINDS]
    library = library_logits(builtin_model_dir, dirs, PROMPTS, tmp_path / "library")
    for ours, want in zip(module_logits(hf_base(builtin_model_dir)), library["base"]):
        torch.testing.assert_close(ours, torch.tensor(want), atol=1e-4, rtol=0, msg="base")
    for kind, path in zip(KINDS, dirs):
        ours = module_logits(load(path, hf_base(builtin_model_dir)))
        for got, want in zip(ours, library[str(path)]):
            torch.testing.assert_close(got, torch.tensor(want), atol=1e-4, rtol=0, msg=kind)


@pytest.mark.parametrize("overrides, fragment", [
    (dict(quantization="nf4"), "unquantized base only"),
    (dict(reduction_factor=0.0), "--reduction-factor must be positive"),
    (dict(activation="softplus"), "--activation 'softplus'"),
])
def test_bad_options_are_refused_before_training(overrides, fragment, cache, tmp_path):
    data = write_jsonl(tmp_path / "task.jsonl", task_rows())
    with pytest.raises(TrainError, match=fragment.replace("(", r"\(")):
        train_adapter(config("pfeiffer", data, tmp_path / "out", cache, **overrides))
    assert not (tmp_path / "out").exists()


def test_bottleneck_options_on_another_kind_are_refused(cache, tmp_path):
    data = write_jsonl(tmp_path / "task.jsonl", task_rows())
    with pytest.raises(TrainError, match="for the bottleneck kinds"):
        train_adapter(TrainConfig(kind="lora", data=data, out=tmp_path / "out", base=BUILTIN, cache_dir=cache,
                                  steps=1, reduction_factor=8, progress=False, eval_fraction=0.0))


def test_a_width_above_the_default_server_limit_is_warned_about(cache, builtin_model_dir, tmp_path, caplog):
    from transformers import AutoConfig

    data = write_jsonl(tmp_path / "task.jsonl", task_rows())
    with caplog.at_level(logging.WARNING, logger="adapters.train"):
        result = train_adapter(config("parallel", data, tmp_path / "out", cache, steps=1, reduction_factor=None))
    assert "int(256 // 2) = 128 is above 64" in caplog.text and "--reduction-factor 4" in caplog.text
    spec = BaseSpec.from_hf_config(AutoConfig.from_pretrained(builtin_model_dir), BUILTIN)
    assert load_adapter(result.out, spec, max_rank=128).rank == 128


def test_upload_sends_the_library_file_names(trained, monkeypatch):
    import httpx

    sent = {}

    def post(url, data, files, headers, timeout):
        sent.update(url=url, names=[f[1][0] for f in files], data=data)
        return httpx.Response(200, json={"name": data["name"]}, request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", post)
    upload_adapter(trained["houlsby"].out, "h", server="http://127.0.0.1:1")
    assert sent["names"] == ["adapter_config.json", "adapter.safetensors"]
