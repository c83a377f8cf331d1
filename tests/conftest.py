import logging
import os
import tempfile

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Engines built without an explicit adapter dir must not touch the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ADAPTER_SERVER_CACHE", tempfile.mkdtemp(prefix="adapter-server-tests-"))
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{'llama': path, 'mistral': path, 'qwen2': path}."""
    from tests.tiny_models import ARCHITECTURES, make_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: make_checkpoint(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory):
    from server.model.builtin import ensure_builtin_model

    return ensure_builtin_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def kernel():
    """The compiled CPU kernels (server.model.cpu_ext), or the test is skipped where they cannot be built."""
    from server.model import cpu_ext

    module = cpu_ext.kernel()
    if module is None:
        pytest.skip("no compiler for the CPU kernels here")
    return module
