"""API keys and tenants: inference keys may run completions and list models; admin keys may also manage adapters.

Keys come from ``ServerConfig.api_keys`` / ``admin_keys`` and from ``api_key_file``: one key per
line, ``KEY`` or ``inference KEY`` for an inference key, ``admin KEY`` for an admin key, optionally
followed by ``tenant=NAME`` and, on any line of that tenant, ``weight=W`` (its share in fair
admission, default 1) and ``max_waiting=N`` (its own queue bound); blank lines and ``#`` comments
are ignored. An admin key without a tenant is the operator. Clients send ``Authorization: Bearer KEY``
(what the OpenAI clients do) or ``X-API-Key: KEY``. With no keys configured, every client is the
operator. The check is an ASGI middleware, so it runs before any request body is read, and it
leaves the caller (:class:`Caller`) in ``request.state.caller`` for the routes:

* ``/v1/adapters...``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``: admin scope;
* any other ``/v1/...`` path, and ``/tokenize``, ``/detokenize`` (vLLM's paths): inference scope;
* ``/metrics``: open, unless some key has a tenant; then only the operator (its adapter labels name
  every tenant's adapters);
* everything else (``/health``, the docs): open.

401 without a valid key, 403 for a key without the scope the path needs.
"""
from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from adapters.format import AdapterError
from adapters.store import validate_name
from server.api.errors import error_response
from server.config import ServerConfig
from server.engine.fairness import Tenant

ADMIN, INFERENCE, OPERATOR = "admin", "inference", "operator"
ADMIN_PREFIX = "/v1/adapters"
PROTECTED_PREFIX = "/v1/"
INFERENCE_PATHS = frozenset({"/tokenize", "/detokenize"})
METRICS_PATH = "/metrics"
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})  # vLLM's runtime adapter loading


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's scope and tenant (None: the operator's namespace)."""
    scope: str
    tenant: str | None = None

    @property
    def operator(self) -> bool:
        """An admin key without a tenant (or a server without keys): sees and manages every adapter."""
        return self.scope == ADMIN and self.tenant is None


OPERATOR_CALLER = Caller(ADMIN, None)


@dataclass(frozen=True)
class KeySet:
    inference: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()
    key_tenants: Mapping[str, str] = field(default_factory=dict)  # key -> tenant name, for tenants' keys only
    tenants: Mapping[str, Tenant] = field(default_factory=dict)  # tenant name -> its terms

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.admin)

    def scope_of(self, key: str) -> str | None:
        """ADMIN, INFERENCE or None; compares against every key in constant time."""
        encoded = key.encode()
        is_admin = any([hmac.compare_digest(encoded, k.encode()) for k in self.admin])
        is_inference = any([hmac.compare_digest(encoded, k.encode()) for k in self.inference])
        return ADMIN if is_admin else INFERENCE if is_inference else None

    def caller(self, key: str) -> Caller | None:
        """The caller a key stands for, or None for an unknown key."""
        scope = self.scope_of(key)
        if scope is None:
            return None
        tenant = next((t for k, t in self.key_tenants.items() if hmac.compare_digest(key.encode(), k.encode())), None)
        return Caller(scope, tenant)


_TERMS = ("tenant", "weight", "max_waiting")


def _terms(fields: list[str], where: str) -> dict[str, str]:
    terms = {}
    for item in fields:
        name, sep, value = item.partition("=")
        if not sep or name not in _TERMS or not value or name in terms:
            raise ValueError(f"{where}: expected 'tenant=NAME', 'weight=W' or 'max_waiting=N' after the key, "
                             f"got {item!r}")
        terms[name] = value
    if terms and "tenant" not in terms:
        raise ValueError(f"{where}: weight and max_waiting belong to a tenant: add tenant=NAME")
    return terms


def _tenant(terms: dict[str, str], where: str) -> Tenant:
    name = terms["tenant"]
    try:
        validate_name(name)
    except AdapterError:
        raise ValueError(f"{where}: tenant {name!r} is not a valid name (letters, digits, '.', '_', '-')") from None
    try:
        weight = float(terms.get("weight", "1"))
        max_waiting = int(terms["max_waiting"]) if "max_waiting" in terms else None
    except ValueError:
        raise ValueError(f"{where}: weight must be a number and max_waiting an integer") from None
    if not (0 < weight <= 1e6) or (max_waiting is not None and max_waiting < 1):
        raise ValueError(f"{where}: weight must be in (0, 1e6] and max_waiting at least 1")
    return Tenant(name, weight, max_waiting)


def parse_key_file(path: str | Path) -> KeySet:
    """Read a key file; raises ValueError naming the file and line of anything malformed."""
    inference, admin, key_tenants, tenants = set(), set(), {}, {}
    text = Path(path).read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        parts = line.split()
        if len(parts) == 1:
            inference.add(parts[0])
            continue
        if parts[0] not in (ADMIN, INFERENCE):
            raise ValueError(f"{where}: expected 'KEY', 'inference KEY' or 'admin KEY' (then tenant=NAME)")
        key, terms = parts[1], _terms(parts[2:], where)
        (admin if parts[0] == ADMIN else inference).add(key)
        if terms:
            tenant = _tenant(terms, where)
            known = tenants.get(tenant.name)
            if known is not None and ("weight" in terms or "max_waiting" in terms) and known != tenant:
                raise ValueError(f"{where}: tenant {tenant.name!r} was given other terms on an earlier line")
            if known is None or "weight" in terms or "max_waiting" in terms:
                tenants[tenant.name] = tenant
            if key_tenants.get(key, tenant.name) != tenant.name:
                raise ValueError(f"{where}: this key already belongs to tenant {key_tenants[key]!r}")
            key_tenants[key] = tenant.name
    return KeySet(frozenset(inference), frozenset(admin), key_tenants, tenants)


def load_keys(config: ServerConfig) -> KeySet:
    """All keys of ``config``: the listed ones (no tenant) plus those of its key file."""
    inference, admin = set(config.api_keys), set(config.admin_keys)
    key_tenants, tenants = {}, {}
    if config.api_key_file:
        from_file = parse_key_file(config.api_key_file)
        inference |= from_file.inference
        admin |= from_file.admin
        key_tenants, tenants = dict(from_file.key_tenants), dict(from_file.tenants)
    for key in inference | admin:
        if not key or any(c.isspace() for c in key):
            raise ValueError("API keys must be non-empty and contain no whitespace")
    clash = sorted(k for k in key_tenants if k in set(config.api_keys) | set(config.admin_keys))
    if clash:
        raise ValueError("a tenant's key from the key file is also given without a tenant (--api-key/--admin-key)")
    return KeySet(frozenset(inference), frozenset(admin), key_tenants, tenants)


def request_key(scope: Scope) -> str | None:
    """The key a request carries, from ``Authorization: Bearer`` or ``X-API-Key``."""
    headers = {k.lower(): v for k, v in scope.get("headers", ())}
    authorization = headers.get(b"authorization", b"").decode("latin-1").strip()
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    api_key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return api_key or None


def required_scope(path: str, tenants: bool = False) -> str | None:
    if path == METRICS_PATH:
        return OPERATOR if tenants else None
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/") or path in ADMIN_PATHS:
        return ADMIN
    if path.startswith(PROTECTED_PREFIX) or path in INFERENCE_PATHS:
        return INFERENCE
    return None


class AuthMiddleware:
    """Refuses requests without the scope their path needs (see the module docstring)."""

    def __init__(self, app: ASGIApp, keys: KeySet):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})  # the dict behind request.state
        if not self.keys.enabled:
            state["caller"] = OPERATOR_CALLER
            return await self.app(scope, receive, send)
        needed = required_scope(scope.get("path", ""), tenants=bool(self.keys.tenants))
        key = request_key(scope)
        caller = self.keys.caller(key) if key else None
        if needed is None:
            state["caller"] = caller or Caller(INFERENCE, None)
            return await self.app(scope, receive, send)
        if caller is None:
            message = "invalid API key" if key else "missing API key: send 'Authorization: Bearer <key>'"
            response = error_response(401, message, code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        elif needed == ADMIN and caller.scope != ADMIN:
            response = error_response(403, "this API key may not manage adapters; use an admin key",
                                      code="insufficient_scope")
        elif needed == OPERATOR and not caller.operator:
            response = error_response(403, "metrics are the operator's: use an admin key without a tenant",
                                      code="insufficient_scope")
        else:
            state["caller"] = caller
            return await self.app(scope, receive, send)
        await response(scope, receive, send)
