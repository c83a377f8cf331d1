"""GGUF files -> ordinary Hugging Face checkpoint directories, converted once, cached by content.

``ensure_gguf_model(FILE.gguf)`` returns a directory that our loader (and transformers) read like
any checkpoint: ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32),
``tokenizer.json`` + ``tokenizer_config.json`` and the chat template (``chat_template.jinja``),
then ``gguf.json`` (what it was made from) last.

* What is checked first: ``general.architecture``, scanned from the header (gguf_architecture). Only ``llama`` (llama.cpp writes
  Mistral models as ``llama`` too), ``mistral`` and ``qwen2`` are converted; anything else gets
  a clear error naming the architecture, before any dequantization.
* The weights are exactly what transformers' GGUF loader produces
  (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` dequantizes every tensor to
  fp32 and un-permutes llama.cpp's q/k row order), written with safetensors because
  ``save_pretrained`` refuses a GGUF-loaded model; a tied ``lm_head.weight`` is dropped (it is
  the embedding). The config is the loaded one without ``quantization_config`` (it would make
  transformers look for the GGUF file again) and without the GGUF's internal model name.
  The tokenizer (BPE rebuilt from the GGUF vocabulary and merges, with its chat template and
  special tokens) is saved with ``save_pretrained``.
* Cache: ``<cache>/models/gguf-<sha256[:16]>/<name>/``: the key is the sha256 of the file's
  bytes (hashing 93 MB takes ~0.2 s here, so it is recomputed at each start rather than
  trusted from a path or an mtime); ``<name>`` is the served model name (the loader names a
  model after its directory), the file's stem unless the caller gives one. The same bytes asked
  for under a second name (the default model, then its file as ``--model``) hard-link the first
  conversion's files instead of converting again.
* Creation is atomic like the built-in model's: written into a temp dir beside the target,
  fsynced, renamed into place. A concurrent caller that loses the rename race uses the
  winner's directory; a crash leaves only a stray temp dir. Measured here (SmolLM2-135M Q4_1,
  2 busy cores): ~20-40 s, most of it rebuilding the tokenizer and dequantizing; 540 MB written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import threading
from importlib.metadata import version
from pathlib import Path

from adapters.fsutil import fsync_path, publish_dir
from server.model.builtin import default_cache_dir

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
CONVERTER_VERSION = 1  # bump when anything below changes what is written
MARKER = "gguf.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)
_LOCK = threading.Lock()  # same-process callers convert once; other processes race on rename


class GGUFError(ValueError):
    """A GGUF file that cannot be served: unreadable, or an architecture we do not run."""


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file (e.g. ``"llama"``), scanned from its header.

    ``gguf.GGUFReader`` parses every field first, the 49152-entry vocabulary included: 7.5 s here
    for SmolLM2 (busy cores), against 60 ms (mostly importing gguf) for this scan, which stops at
    the key (llama.cpp writes it first) and seeks over the values before it. Types and magic are
    the gguf package's.
    """
    try:
        with open(path, "rb") as f:
            arch = _scan_architecture(f)
    except (OSError, ValueError, struct.error) as exc:
        raise GGUFError(f"{path} is not a readable GGUF file: {exc}") from exc
    if arch is None:
        raise GGUFError(f"{path} has no general.architecture field; it is not a model GGUF file")
    return arch


def _read(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return data


def _read_str(f, order: str) -> str:
    (n,) = struct.unpack(order + "Q", _read(f, 8))
    if n > 1 << 20:
        raise ValueError(f"implausible GGUF string length {n}")
    return _read(f, n).decode("utf-8", errors="replace")


def _skip_value(f, vtype: int, order: str) -> None:
    from gguf import GGUFValueType as T

    sizes = {T.UINT8: 1, T.INT8: 1, T.BOOL: 1, T.UINT16: 2, T.INT16: 2, T.UINT32: 4, T.INT32: 4,
             T.FLOAT32: 4, T.UINT64: 8, T.INT64: 8, T.FLOAT64: 8}
    if vtype in sizes:
        f.seek(sizes[vtype], os.SEEK_CUR)
    elif vtype == T.STRING:
        (n,) = struct.unpack(order + "Q", _read(f, 8))
        f.seek(n, os.SEEK_CUR)
    elif vtype == T.ARRAY:
        item_type, count = struct.unpack(order + "IQ", _read(f, 12))
        if item_type in sizes:
            f.seek(sizes[item_type] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item_type, order)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")


def _scan_architecture(f) -> str | None:
    from gguf import GGUF_MAGIC, GGUFValueType

    if struct.unpack("<I", _read(f, 4))[0] != GGUF_MAGIC:
        raise ValueError("GGUF magic invalid")
    (version,) = struct.unpack("<I", _read(f, 4))
    order = ">" if version & 0xFFFF == 0 else "<"  # a big-endian file, as GGUFReader detects it
    _, kv_count = struct.unpack(order + "QQ", _read(f, 16))
    for _ in range(kv_count):
        key = _read_str(f, order)
        (vtype,) = struct.unpack(order + "I", _read(f, 4))
        if key == "general.architecture" and vtype == GGUFValueType.STRING:
            return _read_str(f, order)
        _skip_value(f, vtype, order)
    return None


def check_architecture(path: str | Path) -> str:
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; this server runs "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} models (GGUF general.architecture)")
    return arch


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(sha256: str, name: str, cache_dir: Path | None = None) -> Path:
    root = Path(cache_dir if cache_dir is not None else default_cache_dir())
    return root / "models" / f"gguf-{sha256[:16]}" / name


def is_complete(path: Path, sha256: str) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("sha256") == sha256 and marker.get("converter_version") == CONVERTER_VERSION
            and all((path / f).is_file() for f in REQUIRED_FILES))


def ensure_gguf_model(gguf_path: str | Path, cache_dir: Path | None = None, name: str | None = None) -> Path:
    """The converted checkpoint directory for ``gguf_path``, converting it on first use."""
    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"no GGUF file at {src}")
    name = name or src.stem
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(f"bad model name {name!r}")
    sha256 = file_sha256(src)
    target = converted_dir(sha256, name, cache_dir)
    if is_complete(target, sha256):
        return target
    arch = check_architecture(src)
    with _LOCK:
        if not is_complete(target, sha256):
            _create(src, target, sha256, arch)
    return target


def convert(src: Path, dest: Path, sha256: str, arch: str, name: str) -> None:
    """Write the HF directory for GGUF ``src`` into the existing empty directory ``dest``."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=src.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kwargs)
    config = model.config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config.update(architectures=[type(model).__name__], dtype="float32")
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(dest)
    model_max_length = model.config.max_position_embeddings
    del model, state
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
    tokenizer.save_pretrained(dest)
    # save_pretrained also records how it was loaded (local_files_only, is_local) and no length limit.
    tok_config = json.loads((dest / "tokenizer_config.json").read_text())
    for key in ("local_files_only", "is_local", "gguf_file"):
        tok_config.pop(key, None)
    tok_config["model_max_length"] = model_max_length
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    # The marker goes last: a directory without a matching one is never treated as complete.
    (dest / MARKER).write_text(json.dumps({
        "name": name, "source": str(src), "sha256": sha256, "architecture": arch,
        "converter_version": CONVERTER_VERSION, "transformers": transformers.__version__,
        "gguf": version("gguf"), "torch": torch.__version__,
    }, indent=2) + "\n")
    for f in dest.iterdir():
        fsync_path(f)
    fsync_path(dest)


def _link_files(src_dir: Path, dest: Path, name: str) -> None:
    """Hard-link (copy where links fail) a complete conversion's files into ``dest``, renamed ``name``."""
    for f in src_dir.iterdir():
        if f.name != MARKER:
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)
    marker = json.loads((src_dir / MARKER).read_text())
    (dest / MARKER).write_text(json.dumps({**marker, "name": name}, indent=2) + "\n")
    fsync_path(dest / MARKER)
    fsync_path(dest)


def _create(src: Path, target: Path, sha256: str, arch: str) -> None:
    logger.info("converting %s (%s) into %s (once; about half a minute)", src, arch, target)

    def write(tmp: Path) -> None:
        sibling = next((d for d in target.parent.iterdir() if d.name != target.name and not d.name.startswith(".")
                        and is_complete(d, sha256)), None)
        if sibling is not None:  # the same bytes converted under another name: share its files
            _link_files(sibling, tmp, target.name)
        else:
            convert(src, tmp, sha256, arch, target.name)

    publish_dir(target, write, lambda path: is_complete(path, sha256))