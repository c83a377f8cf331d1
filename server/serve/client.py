"""RayEngineClient: the engine contract of the HTTP layer, served by engine replicas on Ray Serve.

The ingress's FastAPI app (``create_app``, unchanged) talks to ``ctx.engine``; this class is that
engine. What needs no model runs here: the tokenizer (encode, decode, chat templates), request
validation (``Engine.make_request`` itself, on this object's vocabulary, context and store), the
adapter store (uploads are validated against the base's config, no weights) and metrics. What
needs the model goes to a replica: :meth:`stream` calls ``EngineReplica.generate`` through the
deployment handle with ``multiplexed_model_id`` = the request's adapter version (``""`` for the
base, which Ray Serve spreads over the replicas by queue length).

Faults: when the replica dies (or the call fails in Ray) before the request produced any output,
the request is sent again (``retries`` times; the router drops the dead replica); after an
output, the request ends with ``finish_reason="error"`` and a message naming the replica, which the
HTTP layer reports as a 500 (or an error event in a stream).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

from adapters.composition import resolve as resolve_composition
from adapters.format import BaseSpec, load_adapter
from adapters.store import AdapterStore
from server.api.errors import as_api_error
from server.config import EngineConfig
from server.engine.detokenizer import TokenizerText
from server.engine.engine import Engine, _eos_ids
from server.engine.factory import resolve
from server.engine.request import QueueFull, Request, RequestOutput
from server.engine.streams import QueuedOutputs
from server.model.builtin import default_cache_dir
from server.model.loader import _generation_config, parse_dtype
from server.serve.metrics import RayIngressMetrics
from server.serve.trace import current_trace

log = logging.getLogger(__name__)


class RayEngineClient(TokenizerText):
    """The engine contract (see server/api) over a ``DeploymentHandle`` to ``EngineReplica``."""

    def __init__(self, engine_config: EngineConfig, handle, *, replicas: int = 1, retries: int = 2,
                 max_adapter_labels: int = 20):
        from transformers import AutoConfig, AutoTokenizer

        from server.model.llama import ModelArgs

        config = resolve(engine_config)
        path = Path(config.model)
        self.config = config
        self.handle = handle
        self.retries = retries
        self.hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        args = ModelArgs.from_hf_config(self.hf_config)
        self.model_name = path.name
        self.vocab_size = args.vocab_size
        self.max_seq_len = min(config.max_seq_len or args.max_position_embeddings, args.max_position_embeddings)
        self.adapter_store = AdapterStore(Path(config.adapter_dir or default_cache_dir() / "adapters"))
        # what Engine.make_request reads besides vocab_size and max_seq_len
        self.adapters = SimpleNamespace(record=self.adapter_store.get, plan=lambda composition: resolve_composition(
            self.adapter_store, composition, max_rank=engine_config.max_lora_rank))
        self.eos_token_ids = _eos_ids(SimpleNamespace(hf_config=self.hf_config, tokenizer=self.tokenizer,
                                                      generation_config=_generation_config(path)))
        self.grammars = _grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._base = BaseSpec.from_hf_config(self.hf_config, self.model_name)
        self._dtype = parse_dtype(config.dtype)
        self.max_in_flight = replicas * (config.max_batch + config.max_waiting)
        self.streams: set[RayRequestStream] = set()
        self._background: set[asyncio.Task] = set()
        self.metrics = RayIngressMetrics(self._replica_texts, max_adapter_labels=max_adapter_labels)

    # ---- requests (encode / decode: TokenizerText) ----

    def make_request(self, prompt_token_ids: list[int], params, adapter: str | None = None,
                     request_id: str | None = None, composition=None) -> Request:
        """Exactly the engine's validation (same code), on this client's vocabulary, context and store."""
        return Engine.make_request(self, prompt_token_ids, params, adapter=adapter, request_id=request_id,
                                   composition=composition)

    def stream(self, request: Request) -> "RayRequestStream":
        """Send ``request`` to a replica; raises QueueFull past ``replicas * (max_batch + max_waiting)``."""
        if len(self.streams) >= self.max_in_flight:
            raise QueueFull(f"{self.max_in_flight} requests are in flight on the replicas; try again later")
        return RayRequestStream(self, request)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.streams if s.started)

    @property
    def num_waiting(self) -> int:
        return sum(1 for s in self.streams if not s.started)

    # ---- adapters ----

    def validate_adapter(self, path, name: str) -> None:
        """Raise AdapterError unless the adapter at path can be served on this base (config only)."""
        load_adapter(path, self._base, max_rank=self.config.max_lora_rank, name=name, dtype=self._dtype)

    def invalidate_adapter(self, name: str) -> None:
        """Tell every replica (broadcast, in the background) that ``name`` changed in the store.

        Correctness does not wait for it: replicas resolve the name in the index on every request.
        """
        try:
            task = asyncio.get_running_loop().create_task(self._broadcast("invalidate", name))
        except RuntimeError:  # no event loop (offline use): nothing to tell
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _broadcast(self, method: str, *args) -> list:
        try:
            return await self.handle.broadcast(method, *args).results_async(timeout_s=10, return_exceptions=True)
        except Exception as exc:  # a replica set in flux: the per-request version check still holds
            log.warning("broadcast %s to the engine replicas failed: %s", method, exc)
            return []

    async def _replica_texts(self) -> list[tuple[str, str]]:
        return [r for r in await self._broadcast("metrics_text") if isinstance(r, tuple)]

    # ---- lifecycle ----

    def start(self) -> None:
        pass  # the replicas start their engines themselves

    def shutdown(self) -> None:
        for stream in list(self.streams):
            stream.abort()


def _grammars(tokenizer, vocab_size: int, eos_token_ids):
    """The engine's response-format compiler, so that the ingress refuses a bad format with a 400 itself."""
    try:
        from server.engine.structured import Grammars
    except ImportError:  # an engine without structured output
        return None
    return Grammars(tokenizer, vocab_size, eos_token_ids)


class RayRequestStream(QueuedOutputs):
    """Async iterator over one request's outputs from a replica; ``abort()`` cancels it there.

    Starts at once (so the replica is known before the HTTP response starts); settles the HTTP
    request's :class:`~server.serve.trace.ReplicaTrace` with the replica of its first output.
    """

    def __init__(self, client: RayEngineClient, request: Request):
        self.client = client
        self.request = request
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False
        self.started = False  # an output arrived
        self.replica: str | None = None
        self._trace = current_trace()
        if self._trace is not None:
            self._trace.opened()
        self._settled = False
        client.streams.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _payload(self) -> dict:
        r = self.request
        return {"prompt_token_ids": r.prompt_token_ids, "params": r.params, "adapter": r.adapter,
                "composition": r.composition, "adapter_version": r.adapter_version, "request_id": r.request_id}

    async def _run(self) -> None:
        metrics = self.client.metrics
        try:
            for attempt in range(self.client.retries + 1):
                handle = self.client.handle.options(multiplexed_model_id=self.request.adapter_version or "",
                                                    stream=True)
                call = handle.generate.remote(self._payload())
                try:
                    async for item in call:
                        if isinstance(item, dict):  # the first message names the replica
                            self.replica = item["replica"]
                            metrics.record_route(self.replica, item["hit"])
                            if "error" in item:  # a refusal (400/404/429), raised to the HTTP layer
                                self._put(as_api_error(item["error"]))
                                return
                            item = item["outputs"]
                        for output in item:
                            self._put(output)
                    if not self.finished:
                        raise RuntimeError("the replica's stream ended before the request finished")
                    return
                except asyncio.CancelledError:
                    call.cancel()
                    raise
                except Exception as exc:
                    if self.started or attempt == self.client.retries:
                        metrics.replica_failures.inc()
                        self._put(self._failure(exc))
                        return
                    metrics.retries.inc()
                    log.warning("request %s failed on %s before any output (%s); retrying", self.request.request_id,
                                self.replica or "a replica", type(exc).__name__)
                    await asyncio.sleep(0.1 * (attempt + 1))
        finally:
            self._settle()
            self.client.streams.discard(self)

    def _failure(self, exc: Exception) -> RequestOutput:
        where = f"replica {self.replica}" if self.replica else "the engine replica"
        r = self.request
        return RequestOutput(r.request_id, [], "", None, True, "error", len(r.prompt_token_ids), 0,
                             error=f"{where} failed while serving this request ({type(exc).__name__}); "
                                   "send the request again")

    def _put(self, item) -> None:
        if isinstance(item, RequestOutput):
            self.started = True
            if item.finished:
                self.finished = True
        else:
            self.finished = True
        self._settle()
        self.queue.put_nowait(item)

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            if self._trace is not None:
                self._trace.settle(self.replica if self.started else None)

    def abort(self) -> None:
        """Cancel the request on its replica (idempotent; synchronous, so safe in a cancelled task)."""
        self.finished = True
        if not self._task.done():
            self._task.cancel()
        self._settle()
