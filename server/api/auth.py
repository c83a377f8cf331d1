"""API keys: inference keys may run completions and list models; admin keys may also manage adapters.

Keys come from ``ServerConfig.api_keys`` / ``admin_keys`` and from ``api_key_file`` (one key
per line: ``KEY`` or ``inference KEY`` for an inference key, ``admin KEY`` for an admin key;
blank lines and ``#`` comments are ignored). Clients send ``Authorization: Bearer KEY`` (what
the OpenAI clients do) or ``X-API-Key: KEY``. With no keys configured, every client has every
scope. The check is an ASGI middleware, so it runs before any request body is read:

* ``/v1/adapters...``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``: admin scope;
* any other ``/v1/...`` path, and ``/tokenize``, ``/detokenize`` (vLLM's paths): inference scope;
* everything else (``/health``, ``/metrics``, the docs): open.

401 without a valid key, 403 for an inference key on an admin path.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_response
from server.config import ServerConfig

ADMIN, INFERENCE = "admin", "inference"
ADMIN_PREFIX = "/v1/adapters"
PROTECTED_PREFIX = "/v1/"
INFERENCE_PATHS = frozenset({"/tokenize", "/detokenize"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})  # vLLM's runtime adapter loading


@dataclass(frozen=True)
class KeySet:
    inference: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.admin)

    def scope_of(self, key: str) -> str | None:
        """ADMIN, INFERENCE or None; compares against every key in constant time."""
        encoded = key.encode()
        is_admin = any([hmac.compare_digest(encoded, k.encode()) for k in self.admin])
        is_inference = any([hmac.compare_digest(encoded, k.encode()) for k in self.inference])
        return ADMIN if is_admin else INFERENCE if is_inference else None


def parse_key_file(path: str | Path) -> KeySet:
    """Read a key file; raises ValueError naming the file and line of anything malformed."""
    inference, admin = set(), set()
    text = Path(path).read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 1:
            inference.add(parts[0])
        elif len(parts) == 2 and parts[0] in (ADMIN, INFERENCE):
            (admin if parts[0] == ADMIN else inference).add(parts[1])
        else:
            raise ValueError(f"{path}:{number}: expected 'KEY', 'inference KEY' or 'admin KEY'")
    return KeySet(frozenset(inference), frozenset(admin))


def load_keys(config: ServerConfig) -> KeySet:
    """All keys of ``config``: the listed ones plus those of its key file."""
    inference, admin = set(config.api_keys), set(config.admin_keys)
    if config.api_key_file:
        from_file = parse_key_file(config.api_key_file)
        inference |= from_file.inference
        admin |= from_file.admin
    for key in inference | admin:
        if not key or any(c.isspace() for c in key):
            raise ValueError("API keys must be non-empty and contain no whitespace")
    return KeySet(frozenset(inference), frozenset(admin))


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


def required_scope(path: str) -> str | None:
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
        if scope["type"] != "http" or not self.keys.enabled:
            return await self.app(scope, receive, send)
        needed = required_scope(scope.get("path", ""))
        if needed is None:
            return await self.app(scope, receive, send)
        key = request_key(scope)
        granted = self.keys.scope_of(key) if key else None
        if granted is None:
            message = "invalid API key" if key else "missing API key: send 'Authorization: Bearer <key>'"
            response = error_response(401, message, code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        elif needed == ADMIN and granted != ADMIN:
            response = error_response(403, "this API key may not manage adapters; use an admin key",
                                      code="insufficient_scope")
        else:
            return await self.app(scope, receive, send)
        await response(scope, receive, send)
