"""What one caller may see of the adapter store, and the names it uses for it.

A tenant's adapters are stored as ``<tenant>~<name>`` (:func:`adapters.store.stored_name`); the
operator's keep their plain names and are shared with every tenant. Every route maps names
through :class:`AdapterView`, so the rule lives in one place:

| caller                         | sees                                 | writes / deletes      |
|--------------------------------|--------------------------------------|-----------------------|
| operator (admin, no tenant)    | everything; a tenant's as ``t~name`` | everything            |
| tenant ``t`` (admin/inference) | its own (shadowing a shared one of   | its own (admin only)  |
|                                | the same name) and the operator's    |                       |
| inference key without a tenant | the operator's                       | nothing               |

Another tenant's adapter answers exactly as a name that does not exist: the same 404 and message.
"""
from __future__ import annotations

from adapters.format import AdapterError
from adapters.store import AdapterNotFound, AdapterRecord, split_stored_name, stored_name, validate_name
from server.api.auth import OPERATOR_CALLER, Caller
from server.api.errors import APIError


class AdapterView:
    """``store`` as ``caller`` sees it. Names in and out are the caller's names."""

    def __init__(self, store, caller: Caller | None):
        self.store = store
        self.caller = caller or OPERATOR_CALLER

    def stored(self, name: str) -> str:
        """The stored name ``name`` refers to for this caller; AdapterNotFound if it sees none."""
        for candidate in self._candidates(name):
            try:
                self.store.get(candidate)
            except (AdapterNotFound, AdapterError):
                continue
            return candidate
        raise AdapterNotFound(f"adapter {name!r} not found")

    def own(self, name: str) -> str:
        """The stored name an upload or a delete of ``name`` by this caller writes: its own namespace."""
        if self.caller.operator:
            tenant, plain = split_stored_name(name)
            return stored_name(tenant, plain)  # validates both parts
        return stored_name(self.caller.tenant, validate_name(name))

    def shown(self, stored: str) -> str:
        """The name this caller knows a stored adapter by."""
        return stored if self.caller.operator else split_stored_name(stored)[1]

    def visible(self, stored: str) -> bool:
        tenant, _ = split_stored_name(stored)
        return self.caller.operator or tenant is None or tenant == self.caller.tenant

    def records(self) -> list[tuple[str, AdapterRecord]]:
        """(shown name, record) of every adapter this caller sees, sorted by shown name; a tenant's own
        adapter hides the operator's of the same name."""
        seen: dict[str, AdapterRecord] = {}
        for record in self.store.list():
            if not self.visible(record.name):
                continue
            shown = self.shown(record.name)
            if shown not in seen or split_stored_name(record.name)[0] is not None:
                seen[shown] = record
        return sorted(seen.items())

    def _candidates(self, name: str) -> list[str]:
        if not isinstance(name, str):
            return []
        if self.caller.operator:
            return [name]
        try:
            validate_name(name)  # a tenant's name never holds '~': it cannot spell another tenant's
        except AdapterError:
            return []
        return [stored_name(self.caller.tenant, name), name] if self.caller.tenant else [name]


def view(ctx, request) -> AdapterView:
    """The store of ``ctx`` as the caller of ``request`` sees it (503 without a store)."""
    return AdapterView(ctx.adapter_store, getattr(request.state, "caller", None))


def view_or_none(ctx, request) -> AdapterView | None:
    store = getattr(ctx.engine, "adapter_store", None)
    return None if store is None else AdapterView(store, getattr(request.state, "caller", None))


def not_found(name: str, param: str = "adapter") -> APIError:
    return APIError(404, f"adapter {name!r} not found", param=param, code="adapter_not_found")
