"""The built-in tiny Llama checkpoint: a real model directory made from nothing.

No model hub is reachable here, so the server, the tests and the benchmarks need a base
model they can create themselves. ``ensure_builtin_model()`` writes an ordinary Hugging
Face checkpoint (``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) that
``AutoModelForCausalLM`` / ``AutoTokenizer`` and our own loader read like any other.

* Model: Llama, hidden 256, 4 layers, 8 heads / 4 KV heads (GQA), untied lm_head, fp32.
  Every in_features is a multiple of 64 (bitsandbytes NF4 on CPU needs that).
* Weights: random but reproducible. Each tensor is drawn from its own CPU
  ``torch.Generator`` seeded from ``(SEED, crc32(name))``, so the bytes do not depend on
  module order or on transformers (not even imported here): same torch -> identical
  safetensors. Linears use HF's std 0.02, norms are ones; embeddings and lm_head are drawn with a
  larger std so that logits spread and greedy decoding does not repeat one token.
* Tokenizer: byte level, no merges: byte ``b`` is token id ``b`` (0..255), then the
  special tokens (ids 256..262). Any UTF-8 text round-trips exactly. ``<|bos|>`` is
  prepended when ``add_special_tokens=True``. The chat template renders
  ``<|bos|><|role|>content<|end|>...`` and, for ``add_generation_prompt``, ends with
  ``<|assistant|>``. Generation stops on ``<|eos|>`` or ``<|end|>``.

Creation is atomic: the files are written into a temp dir next to the target, fsynced,
then renamed into place. ``builtin.json`` (recipe version) is written last; a target
without a matching one is incomplete or outdated and is rebuilt. A concurrent caller that
loses the rename race uses the winner's directory; a crash leaves only a stray temp dir,
never a half-written model.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from pathlib import Path

import torch

from adapters.fsutil import fsync_path, publish_dir

logger = logging.getLogger(__name__)

BUILTIN_MODEL_NAME = "tiny-llama-builtin"
RECIPE_VERSION = 1  # bump when anything below changes what is written
SEED = 20240601
LINEAR_STD = 0.02
EMBED_STD = 0.5
LM_HEAD_STD = 0.5

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
_LOCK = threading.Lock()  # same-process callers build once; other processes race on rename
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "builtin.json")


def default_cache_dir() -> Path:
    """``$ADAPTER_SERVER_CACHE`` if set, else ``~/.cache/adapter-server``."""
    env = os.environ.get("ADAPTER_SERVER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adapter-server"


def _byte_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255 (ByteLevel's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer():
    """The byte-level ``tokenizers.Tokenizer``: ids 0..255 are bytes, then SPECIAL_TOKENS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: i for i, ch in enumerate(_byte_to_unicode())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)])
    return tok


def _configs(tok) -> dict[str, dict]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": LINEAR_STD, "tie_word_embeddings": False,
        "use_cache": True, "bos_token_id": ids[BOS], "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD], "dtype": "float32",
    }
    generation = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[END]],
                  "pad_token_id": ids[PAD], "do_sample": False}
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)]}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
                        "extra_special_tokens": specials["additional_special_tokens"],
                        "chat_template": CHAT_TEMPLATE, "model_max_length": 2048,
                        "clean_up_tokenization_spaces": False, "padding_side": "left"}
    return {"config.json": config, "generation_config.json": generation,
            "special_tokens_map.json": specials, "tokenizer_config.json": tokenizer_config}


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes exactly as ``LlamaForCausalLM(config).state_dict()`` has them (untied head).

    Spelled out rather than read off a transformers model: creation then needs no transformers
    import (whose lazy imports are not thread safe) and cannot change with its version.
    """
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q_out, h), p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h), p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    return shapes


def build_state_dict(config: dict) -> dict[str, torch.Tensor]:
    """All weights, fp32; each tensor drawn from its own generator seeded by its name."""
    out = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=torch.float32)
            continue
        std = EMBED_STD if "embed_tokens" in name else LM_HEAD_STD if name.startswith("lm_head") else LINEAR_STD
        gen = torch.Generator(device="cpu").manual_seed(SEED * 2**32 + zlib.crc32(name.encode()))
        out[name] = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    return out


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / "builtin.json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("recipe_version") == RECIPE_VERSION and all((path / f).is_file() for f in MODEL_FILES)


def _write_model(dest: Path) -> None:
    from safetensors.torch import save_file

    tok = build_tokenizer()
    configs = _configs(tok)
    tok.save(str(dest / "tokenizer.json"))
    for fname, data in configs.items():
        (dest / fname).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file(build_state_dict(configs["config.json"]), str(dest / "model.safetensors"), metadata={"format": "pt"})
    # The marker goes last: a directory without it is never treated as complete.
    (dest / "builtin.json").write_text(json.dumps({"name": BUILTIN_MODEL_NAME, "recipe_version": RECIPE_VERSION,
                                                    "seed": SEED, "torch": torch.__version__}, indent=2) + "\n")
    for f in MODEL_FILES:
        fsync_path(dest / f)
    fsync_path(dest)


def ensure_builtin_model(cache_dir: Path | None = None) -> Path:
    """Return ``<cache_dir>/models/tiny-llama-builtin``, creating it atomically on first use."""
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "models" / BUILTIN_MODEL_NAME
    if _is_complete(target):
        return target
    with _LOCK:
        if not _is_complete(target):
            _create(target)
    return target


def _create(target: Path) -> None:
    logger.info("creating built-in model %s in %s", BUILTIN_MODEL_NAME, target)
    publish_dir(target, _write_model, _is_complete)