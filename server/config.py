"""Configuration: frozen dataclasses built from CLI flags and environment variables."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None          # checkpoint directory; None = the built-in default model
    dtype: str = "auto"               # auto: bfloat16 on CPU/GPU for unquantized bases, float32 compute for tests
    quantization: str = "auto"        # auto: nf4 on CUDA, none on CPU (see README)
    device: str = "auto"              # auto: cuda if available, else cpu
    max_batch: int = 16               # KV-cache rows = requests decoded together
    max_seq_len: int = 1024           # KV-cache length per row (prompt + prefix + output)
    max_waiting: int = 256            # queue bound; beyond it requests are refused (429)
    seed: int = 0                     # seeds the per-request generators of unseeded requests


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
