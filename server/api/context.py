"""What every route needs: the engine, the server configuration, the metrics and the API keys."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi import Request

from server.api.errors import APIError
from server.config import ServerConfig
from server.engine_client import EngineClient
from server.metrics import Metrics


@dataclass(frozen=True)
class ServerContext:
    engine: EngineClient  # the native Engine, the vLLM client or the Ray client (server.engine_client)
    config: ServerConfig
    metrics: Metrics
    started_at: int  # unix time the app was created ("created" of the base model card)
    tenants: Mapping = field(default_factory=dict)  # tenant name -> fairness.Tenant (from the key file)

    def tenant_of(self, caller) -> object | None:
        """The fairness.Tenant whose terms a caller's requests are queued under (None: no tenant)."""
        name = getattr(caller, "tenant", None)
        return None if name is None else self.tenants.get(name)

    @property
    def adapter_store(self):
        """The engine's adapter store; 503 when the engine has none."""
        store = getattr(self.engine, "adapter_store", None)
        if store is None:
            raise APIError(503, "this server has no adapter store", code="no_adapter_store")
        return store


def get_context(request: Request) -> ServerContext:
    """FastAPI dependency: the app's ServerContext."""
    return request.app.state.context
