"""Each engine client (native, vLLM, Ray) against the contract of server.engine_client, member by member.

The clients are checked as classes, so neither vLLM nor Ray has to run: a method must exist with the protocol's
parameters (names, order, defaults), a property must be a property, and an attribute must be assigned in the
class's ``__init__`` (read from its source) or be a class attribute.
"""
import ast
import inspect
import textwrap

import pytest

from server.engine.engine import Engine
from server.engine_client import MEMBERS, EngineClient
from server.serve.client import RayEngineClient
from server.vllm_engine.client import VllmEngineClient

CLIENTS = [Engine, VllmEngineClient, RayEngineClient]


def _assigned_in_init(cls) -> set[str]:
    """Names assigned as ``self.<name> = ...`` in cls.__init__ (and its bases' __init__)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                for leaf in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                        names.add(leaf.attr)
    return names


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_members_list_is_the_protocol():
    declared = set(EngineClient.__annotations__) | {n for n, v in vars(EngineClient).items()
                                                    if callable(v) or isinstance(v, property)} - {"__init__"}
    declared = {n for n in declared if not n.startswith("_")}
    assert declared == set(MEMBERS)


@pytest.mark.parametrize("cls", CLIENTS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("member", MEMBERS)
def test_client_keeps_the_contract(cls, member):
    spec = inspect.getattr_static(EngineClient, member, None)
    if spec is None:  # an annotated attribute
        assert member in _assigned_in_init(cls) or member in vars(cls), f"{cls.__name__} never sets {member}"
        return
    impl = inspect.getattr_static(cls, member, None)
    assert impl is not None, f"{cls.__name__} has no {member}"
    if isinstance(spec, property):
        assert isinstance(impl, property), f"{cls.__name__}.{member} must be a property"
        return
    assert _params(impl) == _params(spec), f"{cls.__name__}.{member}{inspect.signature(impl)} differs from the contract"
