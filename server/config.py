"""Configuration: frozen dataclasses built from CLI flags and environment variables."""
from __future__ import annotations

from dataclasses import dataclass

from server.engine.fairness import DEFAULT_ADMISSION


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None          # checkpoint directory; None = the built-in default model
    dtype: str = "auto"               # auto: bfloat16 on CPU/GPU for unquantized bases, float32 compute for tests
    quantization: str = "auto"        # auto: nf4 on CUDA; CPU: gguf for a Q4 GGUF base with native bf16, else none
    device: str = "auto"              # auto: cuda if available, else cpu
    max_batch: int = 16               # KV-cache rows = requests decoded together
    max_seq_len: int | None = None    # longest request (prefix + prompt + output); None: the model's context
    max_waiting: int = 256            # queue bound; beyond it requests are refused (429)
    max_prefill_tokens: int = 2048    # padded prompt tokens prefilled per engine step (a longer prompt runs alone)
    seed: int = 0                     # seeds the per-request generators of unseeded requests
    adapter_dir: str | None = None    # the adapter store; None = <cache dir>/adapters
    max_adapter_slots: int = 0        # device slots: distinct adapters resident at once; 0 = from adapter_slot_bytes
    max_lora_rank: int = 64           # slot tensors are sized for this rank; higher ranks are refused
    adapter_slot_bytes: int = 1 << 30  # device memory for adapter slots (server.engine.slot_sizing)
    adapter_cache_bytes: int = 1 << 30  # CPU cache of loaded adapters, LRU, bounded in bytes
    # Merge an adapter when its share of running rows stays >= merge_threshold (> 1: never), unmerge it when
    # its share stays below unmerge_threshold. Measured (docs/BENCHMARKS.md, merge sweep, fp32 CPU, batch 16):
    # merged/unmerged throughput 0.92, 0.97, 0.85, 0.92 at shares 0.25, 0.5, 0.75, 0.875 and 0.97-1.0 at 1.0.
    # The other rows' corrections cost more than the per-row LoRA kernel saves, so merge only when every row
    # uses the adapter and unmerge as soon as a tenth of the rows do not.
    merge_threshold: float = 1.0
    unmerge_threshold: float = 0.9
    merge_patience: int = 16          # consecutive steps a share must hold before a merge or unmerge
    merge_min_batch: int = 4          # below this many running rows nothing is merged
    engine: str = "native"            # native (ours) | vllm (LoRA only, vLLM in a worker process: docs/VLLM.md)
    vllm_python: str | None = None    # python of the vLLM worker; None: $ADAPTER_SERVER_VLLM_PYTHON, else .venv-vllm
    # Paged KV cache (server.engine.block_manager): one pool of kv_block_size-position blocks sized by
    # kv_cache_bytes (1 GiB: 2,912 blocks = 46,576 usable positions of the default SmolLM2-135M in bf16,
    # 23,040 bytes a position; never more than max_batch full-length rows), shared by every request; full blocks are
    # reused across requests of the same weights (prefix caching) unless turned off.
    kv_block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    enable_prefix_caching: bool = True
    # Admission order of waiting requests (server.engine.fairness.ADMISSION): fair = the tenant with the least
    # weighted service first (virtual token counter), fifo = arrival order (docs/BENCHMARKS.md, tenants).
    admission: str = DEFAULT_ADMISSION


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"           # the CLI binds 0.0.0.0 by default only when API keys are configured
    port: int = 8000
    log_level: str = "info"
    api_keys: tuple[str, ...] = ()    # inference keys: completions, chat, models
    admin_keys: tuple[str, ...] = ()  # admin keys: all of the above plus adapter management
    api_key_file: str | None = None   # one key per line: "KEY" (inference) or "admin KEY"; "#" starts a comment
    request_timeout: float | None = 600.0  # seconds from arrival to the last token; None = no limit
    max_upload_bytes: int = 1 << 30   # one adapter upload (multipart body), beyond it 413
    max_adapter_labels: int = 20      # adapters named in metric labels; later ones are counted as __other__
    adapter_load_root: str | None = None  # POST /v1/load_lora_adapter reads only under this dir; None = off
