"""The engine replica deployment: one Engine per Ray Serve replica, adapters multiplexed by version.

:meth:`EngineReplica.generate` is a streaming method called by the ingress through
``handle.options(multiplexed_model_id=<adapter version or "">, stream=True)``. It yields lists of
``RequestOutput`` (what one engine step delivered, so a busy replica sends one message per step), the
last holding the finished output. The first message is a dict instead: ``{"replica": label, "hit":
bool | None, "outputs": [...]}``, with the replica's label (``EngineReplica#<id>``, what the
``x-adapter-server-replica`` header shows) and, for an adapter request, whether this replica already
held that version (an affinity hit). A request the replica refuses (``RequestError``, ``QueueFull``,
``AdapterNotFound``, ``AdapterError``) gets one dict with ``"error": exception`` instead of outputs;
the ingress raises it, so the client gets the same 400/404/429 as from the single server.

Multiplexing: the model ID is the adapter version ``name@sha256[:16]``; the multiplexer keeps at
most ``max_adapter_slots`` versions per replica (its LRU matches the engine's slot LRU) and tells
the routers which replica holds which, so an adapter's traffic sticks to one replica. The cached
"model" is only a marker: the weights live in the engine's adapter pool, keyed by the same version.

Stale weights: the replica resolves the adapter name in the shared store's index for every request
(``Engine.make_request``), so a request always gets the version committed now; when a replica
sees a new version of a name it drops its cached copies of the old one (``invalidate_adapter``).
The ingress also broadcasts :meth:`invalidate` after an upload or delete.
"""
from __future__ import annotations

import logging

from ray import serve

from adapters.composition import member_versions
from adapters.format import AdapterError
from adapters.store import StoreError
from server.config import EngineConfig
from server.engine.request import QueueFull, RequestError

log = logging.getLogger(__name__)

REFUSALS = (RequestError, QueueFull, StoreError, AdapterError)  # client errors, sent back as they are


class _Resident:
    """The multiplexer's cached object for one adapter version; ``__del__`` runs when it evicts it."""

    def __init__(self, resident: dict, key: str):
        self.resident, self.key = resident, key
        resident[key] = self

    def __del__(self):  # the multiplexer calls it on eviction, the garbage collector maybe again: idempotent
        if self.resident.get(self.key) is self:
            del self.resident[self.key]


@serve.deployment(name="EngineReplica")
class EngineReplica:
    """Hosts one engine; ``threads`` torch threads; metrics on its own registry, labelled by the ingress."""

    def __init__(self, engine_config: EngineConfig, threads: int = 1, max_adapter_labels: int = 20):
        import torch

        from server.engine.factory import build_engine
        from server.metrics import Metrics

        torch.set_num_threads(max(1, int(threads)))
        context = serve.get_replica_context()
        self.label = f"{context.deployment}#{context.replica_id.unique_id}"
        self.engine = build_engine(engine_config)
        self.metrics = Metrics(max_adapter_labels=max_adapter_labels)
        self.engine.metrics = self.metrics
        self.metrics.bind_engine(self.engine)
        self.engine.start()
        self._resident: dict[str, _Resident] = {}
        self._versions: dict[str, str] = {}  # adapter name -> the version this replica last served

        async def hold(version: str) -> _Resident:
            return _Resident(self._resident, version)

        self._hold = serve.multiplexed(max_num_models_per_replica=self.engine.adapters.table.num_slots)(hold)
        log.info("replica %s ready (%d torch threads)", self.label, torch.get_num_threads())

    async def generate(self, payload: dict):
        """Stream one request (see the module docstring). ``payload``: prompt_token_ids, params,
        adapter, adapter_version, request_id."""
        version = serve.get_multiplexed_model_id()
        hit = None
        if version:
            hit = version in self._resident
            await self._hold(version)
        head = {"replica": self.label, "hit": hit}
        try:
            request = self.engine.make_request(payload["prompt_token_ids"], payload["params"],
                                               adapter=payload["adapter"], request_id=payload["request_id"],
                                               composition=payload.get("composition"))
            if request.adapter_version is not None:
                for version in member_versions(request.adapter_version):  # one, or a composition's members
                    self._note_version(version.split("@")[0], version)
            stream = self.engine.stream(request)
        except REFUSALS as exc:
            yield {**head, "error": exc}
            return
        try:
            batch = []
            async for output in stream:  # what one engine step delivered goes out as one message
                batch.append(output)
                if output.finished or stream.queue.empty():
                    yield batch if head is None else {**head, "outputs": batch}
                    head, batch = None, []
        finally:
            stream.abort()  # the ingress went away or cancelled: free the row (a no-op once finished)

    def _note_version(self, name: str | None, version: str | None) -> None:
        if name is None or version is None:
            return
        if self._versions.get(name, version) != version:  # overwritten since this replica last served it
            self.engine.invalidate_adapter(name)
        self._versions[name] = version

    async def invalidate(self, name: str) -> str:
        """The stored adapter ``name`` changed or went away (broadcast by the ingress)."""
        self.engine.invalidate_adapter(name)
        self._versions.pop(name, None)
        return self.label

    async def metrics_text(self) -> tuple[str, str]:
        """(label, this replica's Prometheus exposition text)."""
        body, _ = self.metrics.render()
        return self.label, body.decode()

    async def info(self) -> dict:
        return {"replica": self.label, "running": self.engine.num_running, "waiting": self.engine.num_waiting,
                "adapters": sorted(self._resident)}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
