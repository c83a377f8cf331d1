"""Requests, their sampling parameters and the outputs streamed back (pure Python, no torch)."""
from __future__ import annotations

import enum
import json
import itertools
import time
from dataclasses import dataclass, field

from adapters.composition import Composition


class RequestError(ValueError):
    """A request the engine refuses; the message is meant for the client (HTTP 400)."""


JSON_OBJECT = '{"type":"json_object"}'


def canonical_response_format(value: dict | None) -> str | None:
    """OpenAI's `response_format` as the canonical JSON string SamplingParams carries; None for text."""
    if not value or value.get("type") in (None, "text"):
        return None
    if value["type"] == "json_object":
        return JSON_OBJECT
    if value["type"] == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise RequestError("response_format json_schema needs a json_schema object with a 'schema' object")
        schema = spec.get("schema", {})
        # keys keep their order: the grammar emits properties in the schema's order, as OpenAI does
        return json.dumps({"type": "json_schema", "schema": schema}, separators=(",", ":"))
    raise RequestError(f"response_format type {value['type']!r} is not supported: use text, json_object or "
                       "json_schema")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (HTTP 429)."""


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests (e.g. its worker process died; HTTP 503)."""


class AdmissionFailed(RuntimeError):
    """A waiting request can never be admitted (e.g. its adapter cannot be loaded); it fails with this message."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0 means off; logprobs None means off,
    0 means only the chosen token's logprob, k > 0 adds the k most likely alternatives.

    Logit adjustments (server.engine.sampling applies them in vLLM's order, to greedy rows too):
    min_tokens: EOS (unless ignore_eos) and stop_token_ids are impossible until that many tokens
    were generated; logit_bias: (token id, bias in [-100, 100]) pairs added to the logits;
    repetition_penalty (HF/vLLM, over prompt and output tokens): a seen token's logit is divided
    by it when positive, multiplied when not (1 = off); frequency_penalty / presence_penalty
    (OpenAI, over output tokens only, in [-2, 2]): logit -= frequency * count + presence * (count > 0);
    min_p: after temperature, tokens whose probability is below min_p * the top probability are
    dropped (0 = off).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # each prompt token's logprob (+ this many alternatives); None = off
    response_format: str | None = None  # canonical JSON of OpenAI's response_format (server.engine.structured)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()

    MAX_LOGPROBS = 20
    MAX_LOGIT_BIAS = 100.0
    MAX_TOP_K = 1 << 20  # above any vocabulary (so still "no cut"), and far inside the int64 a tensor holds

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 0:
            raise RequestError(f"max_tokens must be 0 (only score the prompt) or more, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= self.MAX_TOP_K:
            raise RequestError(f"top_k must be 0 (off) or positive, at most {self.MAX_TOP_K}, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= self.MAX_LOGPROBS:
                raise RequestError(f"{name} must be between 0 and {self.MAX_LOGPROBS}, got {value}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")
        if len(self.stop) > 4:
            raise RequestError(f"at most 4 stop strings are allowed, got {len(self.stop)}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise RequestError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.min_tokens < 0:
            raise RequestError(f"min_tokens must be 0 or positive, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise RequestError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not -self.MAX_LOGIT_BIAS <= bias <= self.MAX_LOGIT_BIAS:
                raise RequestError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")

    def check_vocab(self, vocab_size: int) -> None:
        """logit_bias must name tokens of the model's vocabulary (stop_token_ids may name any id)."""
        for token, _ in self.logit_bias:
            if token >= vocab_size:
                raise RequestError(f"logit_bias names token id {token}, outside the vocabulary [0, {vocab_size})")

    @property
    def adjusts_logits(self) -> bool:
        """True when a logit adjustment applies (min_tokens, logit_bias or a penalty); else sampling skips them."""
        return bool(self.min_tokens or self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

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
    # on a request's first output, when asked: one entry per prompt token (the first None: nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


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
    # cache positions minus rope positions of the row's tokens: 0 (PEFT's prefix: the prompt starts at P), or P
    # for a prefix whose prompt positions start at 0 (AdapterHub's, in MAM: adapters.kinds.mam); set by the engine
    rope_shift: int = 0
    adapter_version: str | None = None  # which stored version of the adapter (or composition) this request uses
    composition: Composition | None = None  # several adapters at once (then `adapter` is None)
    slot: int = 0                        # device slot while running (0 = no adapter)
    num_computed: int = 0                # prompt tokens already prefilled (or scheduled in this step's plan)
    grammar: object | None = None        # compiled response_format grammar (opaque here; the engine's)
    tenant: object | None = None         # fairness.Tenant of the key that sent it (None: no tenant)
    # paged KV cache (server.engine.block_manager, owned by the scheduler)
    block_ids: list[int] = field(default_factory=list)   # the request's blocks, in cache-position order
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its first full blocks
    cache_salt: str = ""                 # the weights' identity in those keys (adapter version, ...)
    cache_epoch: int = 0                 # the scheduler's cache epoch at admission (keys of older ones are dropped)
    num_cache_hit: int = 0               # cache positions served from the prefix cache at its last admission
    num_resumed: int = 0                 # output tokens recomputed as prompt after a preemption

    @property
    def num_tokens(self) -> int:
        """Tokens that occupy the row's KV cache once all are fed (prefix + prompt + output)."""
        return self.prefix_len + len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_fill(self) -> int:
        """Tokens fed by prefill: the prompt, and after a preemption the outputs but the newest."""
        return len(self.prompt_token_ids) + self.num_resumed

    def fill_token_ids(self, start: int, stop: int) -> list[int]:
        """Prefill tokens start..stop-1 (prompt, then resumed outputs)."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:n] + self.output_token_ids[max(start - n, 0):stop - n]

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_fill

    @property
    def prompt_remaining(self) -> int:
        return self.num_fill - self.num_computed

    @property
    def num_cached_prompt_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (OpenAI's usage.prompt_tokens_details.cached_tokens)."""
        return min(max(0, self.num_cache_hit - self.prefix_len), len(self.prompt_token_ids))

    @property
    def num_cached(self) -> int:
        """Cache positions whose K/V are computed once the planned work has run (prefix, prefilled tokens, fed
        outputs; the newest output is fed by the next decode)."""
        return self.prefix_len + self.num_computed + max(0, len(self.output_token_ids) - self.num_resumed - 1)
