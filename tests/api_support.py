"""Helpers for the API tests: engines on the built-in model, live servers, PEFT adapters, archives."""
from __future__ import annotations

import contextlib
import functools
import io
import shutil
import tarfile
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import httpx

from server.api.app import create_app
from server.config import EngineConfig, ServerConfig
from server.engine.factory import build_engine
from tests.server_harness import LiveServer

ENGINE_DEFAULTS = dict(max_batch=4, max_seq_len=256, max_waiting=8, max_adapter_slots=4, max_lora_rank=8,
                       dtype="float32")


def engine_config(base_dir: Path, adapter_dir: Path, **overrides) -> EngineConfig:
    return EngineConfig(model=str(base_dir), adapter_dir=str(adapter_dir), **{**ENGINE_DEFAULTS, **overrides})


@contextlib.contextmanager
def serve(base_dir: Path, adapter_dir: Path, server_config: ServerConfig | None = None, **engine_overrides):
    """A live server on a fresh engine; yields (LiveServer, engine)."""
    engine = build_engine(engine_config(base_dir, adapter_dir, **engine_overrides))
    with LiveServer(create_app(engine, server_config)) as server:
        yield server, engine


@functools.cache
def peft_lora(base_dir: str, seed: int = 0, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A PEFT LoRA adapter with non-trivial weights on the base at ``base_dir`` (made once per process)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  init_lora_weights=False))
    out = Path(tempfile.mkdtemp(prefix=f"api-test-lora-{seed}-"))
    peft_model.save_pretrained(out)
    return out


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tar_gz(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A .tar.gz holding ``files`` (member name -> bytes) and symbolic ``links`` (name -> target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def adapter_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def upload(url: str, name: str, files: list[tuple[str, bytes]], overwrite: bool | None = None,
           headers: dict | None = None) -> httpx.Response:
    data = {"name": name}
    if overwrite is not None:
        data["overwrite"] = "true" if overwrite else "false"
    return httpx.post(f"{url}/v1/adapters", data=data, files=[("files", (fname, blob)) for fname, blob in files],
                      headers=headers, timeout=60)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def with_config(**fields) -> ServerConfig:
    return replace(ServerConfig(), **fields)
