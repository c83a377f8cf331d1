"""`adapter-server`: start the inference server (flags override ADAPTER_SERVER_* environment variables)."""
from __future__ import annotations

import argparse
import logging
import os

from server.config import EngineConfig, ServerConfig

log = logging.getLogger("adapter_server")


def _env(name: str, default):
    value = os.environ.get(f"ADAPTER_SERVER_{name.upper()}")
    return type(default)(value) if value is not None and default is not None else (value or default)


def parse_args(argv: list[str] | None = None) -> tuple[EngineConfig, ServerConfig]:
    e, s = EngineConfig(), ServerConfig()
    p = argparse.ArgumentParser(prog="adapter-server", description=__doc__)
    p.add_argument("--model", default=_env("model", e.model),
                   help="local HF checkpoint dir (Llama, Mistral, Qwen2); default: the built-in tiny model")
    p.add_argument("--dtype", default=_env("dtype", e.dtype), help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantization", default=_env("quantization", e.quantization),
                   help="auto | nf4 | fp4 | int8 | none (auto: nf4 on CUDA, none on CPU)")
    p.add_argument("--device", default=_env("device", e.device), help="auto | cpu | cuda[:N]")
    p.add_argument("--max-batch", type=int, default=_env("max_batch", e.max_batch))
    p.add_argument("--max-seq-len", type=int, default=_env("max_seq_len", e.max_seq_len))
    p.add_argument("--max-waiting", type=int, default=_env("max_waiting", e.max_waiting))
    p.add_argument("--seed", type=int, default=_env("seed", e.seed))
    p.add_argument("--host", default=_env("host", s.host))
    p.add_argument("--port", type=int, default=_env("port", s.port))
    p.add_argument("--log-level", default=_env("log_level", s.log_level))
    a = p.parse_args(argv)
    if a.max_batch < 1 or a.max_seq_len < 2 or a.max_waiting < 1:
        p.error("--max-batch, --max-seq-len and --max-waiting must be positive")
    engine = EngineConfig(model=a.model, dtype=a.dtype, quantization=a.quantization, device=a.device,
                          max_batch=a.max_batch, max_seq_len=a.max_seq_len, max_waiting=a.max_waiting, seed=a.seed)
    return engine, ServerConfig(host=a.host, port=a.port, log_level=a.log_level)


def main(argv: list[str] | None = None) -> None:
    engine_config, server_config = parse_args(argv)
    logging.basicConfig(level=server_config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from server.api.app import create_app
    from server.engine.factory import build_engine

    engine = build_engine(engine_config)
    uvicorn.run(create_app(engine), host=server_config.host, port=server_config.port,
                log_level=server_config.log_level.lower())


if __name__ == "__main__":
    main()
