"""`adapterctl convert DIR`: turn AdapterHub's pickled ``pytorch_adapter.bin`` into ``adapter.safetensors``.

Runs on the user's side, never in the server (which never unpickles). ``torch.load(weights_only=True)``
refuses anything but tensors and plain containers. The library ties tensors across layers (MAM and UniPELT
share their prefix modules), which ``safetensors`` refuses to save ("Some tensors share memory"); each name
gets its own contiguous copy here, written once per name. The config is left as it is. A saved prediction head
(``pytorch_model_head.bin``) is converted the same way to ``model_head.safetensors``: the server accepts it
only when it equals the base's lm_head (adapters.kinds.bottleneck.check_saved_head).
"""
from __future__ import annotations

from pathlib import Path

from adapters.peft_files import HUB_PICKLES, HUB_SAFE_HEAD_NAME, HUB_WEIGHTS_NAME

PICKLE_NAME, HEAD_PICKLE_NAME = HUB_PICKLES


class ConvertError(Exception):
    pass


def convert_dir(path: Path, *, remove_pickle: bool = False) -> Path:
    """Write ``path / adapter.safetensors`` from ``path / pytorch_adapter.bin`` (and ``model_head.safetensors``
    from ``pytorch_model_head.bin`` when present); returns the adapter's written file. Nothing is written unless
    every pickle reads."""
    path = Path(path)
    source, target = path / PICKLE_NAME, path / HUB_WEIGHTS_NAME
    if not source.is_file():
        raise ConvertError(f"{path} has no {PICKLE_NAME} (AdapterHub's save_adapter writes it)")
    pairs = [(source, target)]
    if (path / HEAD_PICKLE_NAME).is_file():
        pairs.append((path / HEAD_PICKLE_NAME, path / HUB_SAFE_HEAD_NAME))
    for _, out in pairs:
        if out.exists():
            raise ConvertError(f"{out} exists already; remove it to convert again")
    converted = [(src, out, _read(src)) for src, out in pairs]  # read every file before writing any
    for src, out, tensors in converted:
        _write(tensors, out)
    if remove_pickle:
        for src, _, _ in converted:
            src.unlink()
    return target


def _read(source: Path) -> dict:
    """{name: an unshared contiguous copy} from a pickled state dict, through the restricted unpickler."""
    import torch

    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal of the restricted unpickler is the user's answer
        raise ConvertError(f"{source} could not be read with torch.load(weights_only=True): {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConvertError(f"{source} does not hold a flat mapping of tensor names to tensors")
    return {name: t.detach().clone().contiguous() for name, t in state.items()}  # unshared, once per name


def _write(tensors: dict, target: Path) -> None:
    from safetensors.torch import save_file

    tmp = target.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(target)
