"""Benchmarks and load tests. Their in-process peers (HF generate, PEFT, the engine alone) run under the
server's process settings (server.process_env), applied here, before any of them imports torch."""
from server import process_env

process_env.apply()
