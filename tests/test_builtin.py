"""The built-in tiny Llama checkpoint: loads with HF offline, is reproducible, is sane."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.model.builtin import BUILTIN_MODEL_NAME, default_cache_dir, ensure_builtin_model

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


def test_layout_and_config(model_dir):
    assert model_dir.name == BUILTIN_MODEL_NAME and model_dir.parent.name == "models"
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"):
        assert (model_dir / f).is_file(), f
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (256, 768, 4)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 4)
    assert cfg["tie_word_embeddings"] is False
    assert not list(model_dir.parent.glob(".*tmp*")), "temp dir left behind"


def test_loads_offline_with_hf(model, tokenizer, model_dir):
    assert model.config.vocab_size == len(tokenizer) == 263
    sd = model.state_dict()
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(sd), "safetensors names must equal LlamaForCausalLM.state_dict() names"
        assert "lm_head.weight" in keys
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.float32 and torch.equal(t, sd[k]), k
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


def test_special_tokens(tokenizer, model):
    ids = tokenizer.convert_tokens_to_ids(SPECIALS)
    assert ids == list(range(256, 263))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == tuple(SPECIALS[:3])
    gen = model.generation_config
    assert gen.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    assert (gen.bos_token_id, gen.pad_token_id) == (tokenizer.bos_token_id, tokenizer.pad_token_id)
    assert tokenizer("hi").input_ids == [tokenizer.bos_token_id, ord("h"), ord("i")]
    assert tokenizer("hi", add_special_tokens=False).input_ids == [ord("h"), ord("i")]


@pytest.mark.parametrize("text", [
    "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n",
    "héllo wörld — ñ ü ß", "日本語のテキスト", "emoji 😀👍🏽 and 👨‍👩‍👧", "", "a <b> & 'c' \"d\" \\e",
])
def test_text_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|bos|><|system|>Be brief.<|end|><|user|>Hi!<|end|>"
                    "<|assistant|>Hello.<|end|><|user|>Again?<|end|><|assistant|>")
    assert text.endswith("<|assistant|>")
    no_prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<|assistant|>")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_greedy_generation_is_varied(model, tokenizer):
    for prompt in ["Once upon a time", "def add(a, b):"]:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        new = out[0, enc.input_ids.shape[1]:].tolist()
        assert len(new) == 32
        assert len(set(new)) > 3, new


def test_linear_in_features_are_multiples_of_64(model):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * 7 + 1
    for m in linears:
        assert m.in_features % 64 == 0, m


def test_deterministic_across_dirs(model_dir, tmp_path):
    other = ensure_builtin_model(tmp_path / "other")
    assert other != model_dir
    for f in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha256(other / f) == _sha256(model_dir / f), f


def test_second_call_does_not_rewrite(model_dir):
    weights = model_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino, model_dir.stat().st_ino)
    assert ensure_builtin_model(model_dir.parent.parent) == model_dir
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino, model_dir.stat().st_ino) == before


def test_concurrent_callers_get_one_complete_dir(tmp_path, model_dir):
    results, errors = [], []

    def call():
        try:
            results.append(ensure_builtin_model(tmp_path))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert _sha256(results[0] / "model.safetensors") == _sha256(model_dir / "model.safetensors")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [BUILTIN_MODEL_NAME]


def test_losing_the_rename_race_uses_the_winners_dir(tmp_path, model_dir, monkeypatch):
    import server.model.builtin as builtin

    target = tmp_path / "models" / BUILTIN_MODEL_NAME
    real_write = builtin._write_model

    def write_then_lose(dest: Path) -> None:  # another process finishes while we build
        real_write(dest)
        shutil.copytree(dest, target)

    monkeypatch.setattr(builtin, "_write_model", write_then_lose)
    assert ensure_builtin_model(tmp_path) == target
    assert _sha256(target / "model.safetensors") == _sha256(model_dir / "model.safetensors")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [BUILTIN_MODEL_NAME]


def test_incomplete_target_is_replaced(tmp_path, model_dir):
    target = tmp_path / "models" / BUILTIN_MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # as if a foreign writer crashed half way
    assert ensure_builtin_model(tmp_path) == target
    assert _sha256(target / "model.safetensors") == _sha256(model_dir / "model.safetensors")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [BUILTIN_MODEL_NAME]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTER_SERVER_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ADAPTER_SERVER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "adapter-server"
