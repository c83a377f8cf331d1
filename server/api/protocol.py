"""Request and response bodies of the OpenAI-compatible API (pydantic).

The generation endpoints' bodies (completions, chat completions) live in
:mod:`server.api.protocol_generation` and are re-exported here; this module holds the rest
(tokenize, models, adapters). The same rules hold: strict types, ``null`` means the default,
unknown fields are ignored, numbers and lists are bounded in the schema.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.protocol_generation import (  # noqa: F401  (re-exported)
    MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_MESSAGES, MAX_N, MAX_PROMPT_TOKENS, MAX_STOP, MAX_TOKEN_ID, MAX_TOKENS, MAX_TOP_K,
    SEED_RANGE, AssistantMessage, ChatChoice, ChatCompletionRequest,
    ChatCompletionResponse, ChatMessage, ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, Prompt, SamplingFields, StreamOptions, TextPart, TokenId, TokenLogprob, TopLogprob, Usage,
    PromptTokensDetails, _check_unicode, _drop_nulls)


class TokenizeRequest(BaseModel):
    """POST /tokenize, vLLM's two shapes in one: ``prompt`` (a string) or chat ``messages``.

    ``add_special_tokens`` defaults as in vLLM: true for a prompt (bos is added), false for messages
    (the chat template writes them). ``add_generation_prompt`` (default true) opens the assistant's
    turn; ``continue_final_message`` leaves the last message open instead (not both).
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    adapter: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None
    tools: list[dict] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return _drop_nulls(_check_unicode(data))

    @model_validator(mode="after")
    def _one_shape(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (a string) or messages (a chat), not both and not neither")
        if self.prompt == "":
            raise ValueError("prompt: must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages: must hold at least one message")
        if self.continue_final_message and self.add_generation_prompt and \
                "add_generation_prompt" in self.model_fields_set:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.chat_template is not None:
            raise ValueError("chat_template is not supported: the model's own template is used")
        if self.tools:
            raise ValueError("tools are not supported")
        return self

    @property
    def special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None

    @property
    def generation_prompt(self) -> bool:
        """vLLM's default opens the assistant's turn, unless the final message is continued."""
        return self.add_generation_prompt and not self.continue_final_message


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids (in [0, vocabulary size)) back to text, special tokens kept (as vLLM)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    adapter: str | None = None
    tokens: list[TokenId] = Field(min_length=1, max_length=MAX_PROMPT_TOKENS)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return _drop_nulls(_check_unicode(data))


# ---------------------------------------------------------------------------------- responses


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adapter-server"
    kind: Literal["base", "lora", "ia3", "prefix"] | str
    parent: str | None = None
    root: str
    max_model_len: int  # tokens a sequence may hold (prompt + output), as vLLM reports it


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    kind: str
    rank: int
    target_modules: list[str]
    base_model: str | None
    num_virtual_tokens: int
    size_bytes: int
    sha256: str
    created_at: str


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
