"""Request and response bodies of /v1/completions and /v1/chat/completions (pydantic).

Request models are strict: a string where a number belongs is a 400, not a silent conversion;
``null`` means "use the default", as in OpenAI's schema. Unknown fields are ignored (clients
send many), but the OpenAI fields this server cannot honour (best_of, suffix, tools) are
refused when set rather than quietly dropped. Every number has bounds in the schema (so /openapi.json states them, and a fuzzer's huge integer is a
400, not an overflow further down): token ids are in [0, 2**31 - 1] here and checked against the
model's vocabulary by the engine; counts (top_k, max_tokens, min_tokens) are at most 2**20; floats
refuse NaN and infinities. Lists (prompts, messages, stop sequences, token ids) have maximum lengths.
Streaming chunks are built as plain dicts in
:mod:`server.api.completions` and :mod:`server.api.chat`; they follow the same shapes.
:mod:`server.api.protocol` re-exports every name here.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters.composition import COMBINATIONS, MAX_MEMBERS as MAX_COMPOSED, MAX_WEIGHT, parse_members
from adapters.peft_files import AdapterError
from server.engine.request import SamplingParams, canonical_response_format

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 4
MAX_LOGIT_BIAS = 100.0
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_TOKEN_ID = 2**31 - 1  # schema bound of a token id; the engine checks the model's vocabulary
MAX_TOP_K = SamplingParams.MAX_TOP_K  # 2**20, above any vocabulary: a top_k past the vocabulary size cuts nothing
MAX_TOKENS = 1 << 20  # max_tokens, max_completion_tokens, min_tokens (the context bounds them further)
MAX_PROMPT_TOKENS = 1 << 20  # token ids in one prompt (the context bounds them further)
MAX_PROMPTS = 1024  # prompts in one completions request
MAX_MESSAGES = 4096  # messages in one chat
MAX_STOP_LENGTH = 4096  # characters of one stop sequence
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_BEST_OF = MAX_N

AdapterName = Annotated[str, Field(min_length=1, max_length=64)]
AdapterWeight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)]
Prompt = (str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | TokenIds
          | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)])
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)]


def _float(default: float, **bounds) -> Any:
    return Field(default=default, allow_inf_nan=False, **bounds)


def _check_prompt(value: Any) -> Any:
    """The prompt's shape, with one clear message (the union's own errors would name every member)."""
    def is_token_list(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    def check_ids(ids: list[int]) -> None:
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"a prompt may hold at most {MAX_PROMPT_TOKENS} token ids, got {len(ids)}")
        bad = next((t for t in ids if not 0 <= t <= MAX_TOKEN_ID), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range; ids must be in [0, {MAX_TOKEN_ID}] "
                             "(and in the model's vocabulary)")

    if isinstance(value, str):
        return value
    if is_token_list(value):
        check_ids(value)
        return value
    if isinstance(value, list) and (all(isinstance(p, str) for p in value) or all(is_token_list(p) for p in value)):
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request, got {len(value)}")
        for ids in value:
            if not isinstance(ids, str):
                check_ids(ids)
        return value
    raise ValueError("must be a string, a list of strings, a list of token ids or a list of token id lists")


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or a list of strings")


def _check_unicode(data: Any) -> Any:
    """JSON may escape a lone surrogate ("\\ud800"), which is no Unicode text: no tokenizer (nor UTF-8) takes it,
    so any string of the body holding one is a 400 naming where it is (not a 500 from the tokenizer)."""
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((*path, key), key) for key in value if isinstance(key, str))
            stack.extend(((*path, key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in enumerate(value))
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = ".".join(map(str, path)) or "the body"
                raise ValueError(f"{where}: not valid Unicode text: lone surrogate {value[exc.start]!r} at "
                                 f"character {exc.start}") from None
    return data


def _drop_nulls(data: Any) -> Any:
    """Clients send ``"temperature": null`` and the like for "not set": use the default."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    """OpenAI's `response_format.json_schema`: the schema the output must validate against."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = Field(default=None, max_length=4096)
    json_schema: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self

    def engine_format(self) -> str | None:
        """The canonical form the engine takes (SamplingParams.response_format)."""
        return canonical_response_format(self.model_dump(by_alias=True))


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    adapter: str | None = None
    # several adapters at once (adapters.composition): names (weight 1 each) or name -> weight, LoRAs combined as
    # PEFT's add_weighted_adapter with adapter_combination (default cat)
    adapters: (Annotated[list[AdapterName], Field(min_length=1, max_length=MAX_COMPOSED)]
               | Annotated[dict[AdapterName, AdapterWeight], Field(min_length=1, max_length=MAX_COMPOSED)]
               | None) = None
    adapter_combination: Literal[COMBINATIONS] | None = None
    temperature: float = _float(1.0, ge=0.0, le=2.0)
    top_p: float = _float(1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K)  # 0: off
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Stop | None = None
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # logit adjustments (semantics and order: server.engine.sampling); vLLM's ranges
    presence_penalty: float = _float(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = _float(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = _float(1.0, gt=0.0, le=2.0)
    min_p: float = _float(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    # token id (as a string, OpenAI's form) -> bias in [-100, 100]
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
                     Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS, allow_inf_nan=False)]] | None = \
        Field(default=None, max_length=MAX_LOGIT_BIAS_TOKENS)
    response_format: ResponseFormat | None = None  # structured output (server.engine.structured)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return _drop_nulls(_check_unicode(data))

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_type(cls, value: Any) -> Any:
        return _check_stop(value)

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters_shape(cls, value: Any) -> Any:
        """One clear message per mistake (the union's own errors would name its members)."""
        names = isinstance(value, list) and all(isinstance(n, str) for n in value)
        weighted = isinstance(value, dict) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                   for w in value.values())
        if not (names or weighted):
            raise ValueError("must be a list of adapter names or an object mapping adapter names to weights")
        try:
            parse_members(value)
        except AdapterError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_keys(cls, value: Any) -> Any:
        """Keys first, with one clear message (the biases' type and range are checked by the schema)."""
        for key in value if isinstance(value, dict) else ():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
            if len(key) > 10 or int(key) > MAX_TOKEN_ID:
                shown = key if len(key) <= 40 else key[:37] + "..."
                raise ValueError(f"token id {shown} is out of range; ids must be in [0, {MAX_TOKEN_ID}] "
                                 "(and in the model's vocabulary)")
        return value

    @model_validator(mode="after")
    def _unsupported(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop sequences are allowed, got {len(self.stop)}")
        if self.stop is not None and any(not s for s in ([self.stop] if isinstance(self.stop, str) else self.stop)):
            raise ValueError("stop: stop sequences must be non-empty strings")
        return self

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as SamplingParams holds it: (token id, bias), by token id."""
        return tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """``echo`` returns the prompt before the completion; with ``logprobs`` too, the logprobs object
    starts with the prompt's tokens (the first one has no logprob). ``max_tokens`` 0 generates
    nothing (as vLLM): with echo and logprobs, that scores the prompt alone."""

    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=0, le=MAX_TOKENS)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_BEST_OF)  # only best_of == n is accepted
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_type(cls, value: Any) -> Any:
        return _check_prompt(value)

    @model_validator(mode="after")
    def _completion_only(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported; use n")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = None

    @model_validator(mode="after")
    def _chat_only(self):
        if self.tools:
            raise ValueError("tools are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------------------------- responses


def _created() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (their K/V were not recomputed)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatChoice]
    usage: Usage
