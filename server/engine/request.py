"""Requests, their sampling parameters and the outputs streamed back (pure Python, no torch)."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request the engine refuses; the message is meant for the client (HTTP 400)."""


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (HTTP 429)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0 means off; logprobs None means off,
    0 means only the chosen token's logprob, k > 0 adds the k most likely alternatives."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    MAX_LOGPROBS = 20

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {self.MAX_LOGPROBS}, got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")
        if len(self.stop) > 4:
            raise RequestError(f"at most 4 stop strings are allowed, got {len(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """One streamed update: the tokens and text produced since the previous update."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    first_token_time: float | None = None
    # cache length before the prompt (prefix-tuning virtual tokens); set from the adapter's record
    prefix_len: int = 0
    adapter_version: str | None = None  # which stored version of the adapter this request uses
    slot: int = 0                        # device slot while running (0 = no adapter)

    @property
    def num_tokens(self) -> int:
        """Tokens that occupy the row's KV cache once all are fed (prefix + prompt + output)."""
        return self.prefix_len + len(self.prompt_token_ids) + len(self.output_token_ids)
