"""PEFT adapter files: the directory layout, the config, the safetensors weights. Never unpickles.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as
PEFT's ``save_pretrained`` writes them. Everything here is independent of the adapter's kind;
:class:`AdapterError` is the one error type of adapter validation (its message names the field,
tensor or file and says what to do about it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_CONVERT_HINT = (
    "convert it to safetensors: load the adapter with PEFT and call "
    "`model.save_pretrained(dir, safe_serialization=True)`, or run "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')` "
    "on a machine where you trust the file"
)


HUB_WEIGHTS_NAME = "adapter.safetensors"  # AdapterHub's save_adapter(..., use_safetensors=True)
HUB_PICKLES = ("pytorch_adapter.bin", "pytorch_model_head.bin")  # AdapterHub's default (pickle) files
HUB_SAFE_HEAD_NAME = "model_head.safetensors"  # a saved prediction head (save_adapter(..., with_head=True))
HUB_HEAD_FILES = ("head_config.json", HUB_SAFE_HEAD_NAME)  # checked against the base's lm_head, never stored
HUB_CONVERT_HINT = ("run `adapterctl convert DIR` on a machine where you trust the file: it writes "
                    f"{HUB_WEIGHTS_NAME} (torch.load with weights_only=True, shared tensors once per name)")


class AdapterError(ValueError):
    """An adapter directory that cannot be served. The message names the field/file and the fix."""

    http_status = 400


def check_files(path: Path) -> tuple[Path, Path]:
    """Return (config, weights) paths; refuse missing files and pickle weights."""
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist or is not a directory")
    config = path / CONFIG_NAME
    weights = path / WEIGHTS_NAME
    pickled = sorted(p.name for p in path.iterdir()
                     if p.is_file() and p.name.startswith("adapter_model") and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise AdapterError(
            f"{pickled[0]} in {path} is a pickle file, which this server never loads (pickle can run code); "
            f"{_CONVERT_HINT}, and upload only adapter_config.json + {WEIGHTS_NAME}")
    hub = sorted(p.name for p in path.iterdir() if p.is_file() and p.name in HUB_PICKLES)
    if hub:
        raise AdapterError(f"{hub[0]} in {path} is a pickle file, which this server never loads (pickle can run "
                           f"code); {HUB_CONVERT_HINT}, and upload adapter_config.json + {HUB_WEIGHTS_NAME}")
    if not config.is_file():
        raise AdapterError(f"{CONFIG_NAME} is missing from {path}; save the adapter with PEFT's save_pretrained")
    hub_weights = path / HUB_WEIGHTS_NAME
    if hub_weights.is_file():
        if weights.is_file():
            raise AdapterError(f"{path} holds both {WEIGHTS_NAME} and {HUB_WEIGHTS_NAME}; upload one adapter at a time")
        return config, hub_weights
    if not weights.is_file():
        others = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" (found pickle file {others[0]}: {_CONVERT_HINT})" if others else ""
        raise AdapterError(f"{WEIGHTS_NAME} is missing from {path}{hint}")
    return config, weights


def read_config(path: Path) -> dict:
    """Parse ``adapter_config.json``; refuse non-JSON or non-object content."""
    try:
        config = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{CONFIG_NAME} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
    return config


def is_set(value: Any) -> bool:
    """A config value that is not its falsy default."""
    return value not in (None, False, "", [], {}, 0)


def check_base_name(config: dict, base: Any) -> None:
    """Refuse an adapter whose ``base_model_name_or_path`` names another base (last path component,
    case-insensitive; unnamed on either side passes)."""
    wanted = config.get("base_model_name_or_path")
    if not wanted or not base.name:
        return
    a = str(wanted).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    b = str(base.name).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    if a and b and a != b:
        raise AdapterError(f"{CONFIG_NAME} field base_model_name_or_path is {wanted!r} but the loaded base is "
                           f"{base.name!r}; an adapter only works on the base it was trained on")


def open_weights(weights: Path) -> tuple[dict[str, tuple[int, ...]], Any]:
    """(tensor name -> shape, an open safetensors handle); reads only the header."""
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{WEIGHTS_NAME} is not a valid safetensors file: {exc}") from None
    if not shapes:
        raise AdapterError(f"{WEIGHTS_NAME} holds no tensors")
    return shapes, handle


def load_tensor(handle: Any, key: str, dtype: torch.dtype) -> torch.Tensor:
    """One tensor, contiguous, in ``dtype``; refuses integer, NaN and Inf tensors."""
    t = handle.get_tensor(key)
    if not t.is_floating_point():
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} has dtype {t.dtype}; adapter weights must be floating point")
    t = t.to(dtype)
    # NaN propagates through aminmax and an Inf is an extreme: one pass and no [numel] bool tensor. isfinite().all()
    # cost 5-7x more: 30 of a rank-64 adapter's 77 ms store read (issue 26).
    low, high = torch.aminmax(t) if t.numel() else (0.0, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} holds NaN or Inf values")
    return t.contiguous()
