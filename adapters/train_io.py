"""The trainer's output side: writing a PEFT directory atomically, and uploading it to a server."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

from adapters.format import CONFIG_NAME, WEIGHTS_NAME
from adapters.peft_files import HUB_WEIGHTS_NAME
from adapters.fsutil import fsync_path
from adapters.train_config import TrainError

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = ("ADAPTER_SERVER_URL", "ADAPTERCTL_SERVER")
API_KEY_ENV = ("ADAPTER_SERVER_API_KEY", "ADAPTERCTL_API_KEY")


class UploadError(RuntimeError):
    """The server refused the upload (``unreachable=True``: it could not be reached at all)."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def save_adapter(model, dest: Path) -> None:
    """Write exactly adapter_config.json + adapter_model.safetensors into the (empty) dir ``dest``."""
    scratch = Path(tempfile.mkdtemp(prefix=".save-", dir=dest))
    try:
        # save_embedding_layers=False: embeddings are never trained here, and "auto" would look the
        # base name up on the model hub.
        with warnings.catch_warnings():
            # PEFT 0.21 takes lora_bias's 1-D lora_B.bias for an unsharded DeepSpeed/FSDP tensor (a false alarm;
            # the server's reader checks every tensor's shape after the save)
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*lora_B\\.bias.*")
            model.save_pretrained(str(scratch), safe_serialization=True, save_embedding_layers=False)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            os.replace(scratch / name, dest / name)  # PEFT's README.md model card stays behind
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config = json.loads((dest / CONFIG_NAME).read_text())
    (dest / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _finish(dest, (CONFIG_NAME, WEIGHTS_NAME))


def save_bottleneck_adapter(model, dest: Path, name: str) -> None:
    """Write AdapterHub's adapter_config.json + adapter.safetensors (adapters.train_bottleneck) into ``dest``."""
    from adapters.train_bottleneck import save

    save(model, dest, name)
    _finish(dest, (CONFIG_NAME, HUB_WEIGHTS_NAME))


def _finish(dest: Path, names: Sequence[str]) -> None:
    """Files readable as the umask says (mkdtemp made the dir private), all synced."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        os.chmod(dest / name, 0o666 & ~umask)
        fsync_path(dest / name)
    os.chmod(dest, 0o777 & ~umask)  # mkdtemp made it private
    fsync_path(dest)


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is replaced only with ``overwrite``."""
    if out.exists() and not overwrite:
        raise TrainError(f"--out {out} already exists; pass --overwrite to replace it")
    trash = None
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / "old")
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if trash is not None:
            os.rename(trash / "old", out)  # put the previous adapter back
        raise TrainError(f"cannot move the trained adapter to {out}: {exc}") from None
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    fsync_path(out.parent)


def _env(names: Sequence[str]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def upload_adapter(path: str | Path, name: str, *, server: str | None = None, api_key: str | None = None,
                   overwrite: bool = False, timeout: float = 120.0) -> dict:
    """POST the adapter dir ``path`` to ``{server}/v1/adapters`` as ``name``; returns the server's JSON.

    ``server`` defaults to ``$ADAPTER_SERVER_URL`` (or ``$ADAPTERCTL_SERVER``), else
    http://127.0.0.1:8000; ``api_key`` to ``$ADAPTER_SERVER_API_KEY`` (or ``$ADAPTERCTL_API_KEY``).
    Raises :class:`UploadError`.
    """
    import httpx

    server = (server or _env(SERVER_ENV) or DEFAULT_SERVER).rstrip("/").removesuffix("/v1")
    api_key = api_key or _env(API_KEY_ENV)
    path = Path(path)
    weights = WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() or not (path / HUB_WEIGHTS_NAME).is_file() \
        else HUB_WEIGHTS_NAME  # the trainer's bottleneck kinds write AdapterHub's name
    files = [("files", (n, (path / n).read_bytes(), "application/octet-stream")) for n in (CONFIG_NAME, weights)]
    data = {"name": name, **({"overwrite": "true"} if overwrite else {})}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(f"{server}/v1/adapters", data=data, files=files, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise UploadError(f"cannot reach {server}: {exc}", unreachable=True) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise UploadError(f"{server} refused the upload of {name!r}: {response.status_code} "
                          f"{message or response.reason_phrase}")
    return body if isinstance(body, dict) else {}

