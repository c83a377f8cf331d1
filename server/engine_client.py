"""The engine-client contract: what the HTTP layer (server/api) and the CLI may call on an engine.

Three implementations, each in a package of its own:

- :class:`server.engine.engine.Engine` (``--engine native``): the engine in this process;
- :class:`server.vllm_engine.client.VllmEngineClient` (``--engine vllm``): vLLM in a worker process;
- :class:`server.serve.client.RayEngineClient` (``adapter-server-ray``): engine replicas on Ray Serve.

The request and output types of the contract are those of ``server.engine.request`` (``Request``,
``RequestOutput``, ``RequestError``) and ``server.engine.sampling`` (``SamplingParams``): torch-free, shared by the
three. ``tests/test_engine_contract.py`` checks each class against this protocol, member by member, with the
signatures below; ``server.api.context.ServerContext.engine`` is typed with it.

Optional members, which the API reads with ``getattr`` and does without: ``adapter_store`` (the uploads and the
adapter admin routes; 503 without it), ``metrics`` (an engine's own metrics object, or None).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: Any  # a HF tokenizer: chat templates and detokenization in the API
    model_name: str  # the served base's name (/v1/models, the "model" field)
    max_seq_len: int  # prompt + completion tokens one request may hold
    vocab_size: int  # logit_bias and token ids are checked against it

    def encode(self, text: str) -> list[int]:
        """The prompt's token ids, with the model's special tokens (BOS)."""

    def decode(self, token_ids: list[int]) -> str:
        """Text of output ids, without special tokens."""

    def make_request(self, prompt_token_ids: list[int], params, adapter: str | None = None,
                     request_id: str | None = None, composition=None):
        """A validated ``Request``; raises ``RequestError`` (a 400/404 in the API) for what cannot be served."""

    def stream(self, request):
        """Submit ``request``; the returned stream yields ``RequestOutput`` deltas and has ``abort()``."""

    @property
    def num_running(self) -> int:
        """Requests holding a batch row now."""

    @property
    def num_waiting(self) -> int:
        """Requests admitted but not yet running."""

    def validate_adapter(self, path, name: str) -> None:
        """Raise ``AdapterError`` unless the adapter files at ``path`` can be served on this base."""

    def invalidate_adapter(self, name: str) -> None:
        """``name`` changed or was deleted in the adapter store: drop what was loaded from it."""

    def start(self) -> None:
        """Begin serving (threads, worker processes); called once by the app's lifespan."""

    def shutdown(self) -> None:
        """Stop serving; outstanding streams end with an error."""


# the members above, in order: the contract test iterates over them
MEMBERS = ("tokenizer", "model_name", "max_seq_len", "vocab_size", "encode", "decode", "make_request", "stream",
           "num_running", "num_waiting", "validate_adapter", "invalidate_adapter", "start", "shutdown")
