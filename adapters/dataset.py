"""Training data for the adapter trainer: JSONL rows -> token sequences with completion-only labels.

Each non-blank line of the file is one JSON object, in one of two forms:

* completion: ``{"prompt": "...", "completion": "..."}``
* chat: ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}``
  -- the last message is the assistant's answer to learn, the ones before it are the prompt.

Other keys are ignored. Rows are tokenized exactly as the server tokenizes requests, so that
what the adapter learns is what the server asks of it:

* completion rows: the prompt is ``tokenizer.encode(prompt, add_special_tokens=True)`` (the
  server's ``/v1/completions``), the target is ``encode(completion, add_special_tokens=False)``
  followed by the end-of-sequence token, so that generation stops after the answer;
* chat rows: the prompt is the chat template applied to ``messages[:-1]`` with
  ``add_generation_prompt=True``, rendered to text and encoded with ``add_special_tokens=False``
  (the server's ``/v1/chat/completions``); the target is what the template renders after that
  for the final assistant message (its content and end-of-turn marker), or, for a template
  whose full rendering does not extend the prompt, the content followed by end-of-sequence.

Labels are ``-100`` on prompt tokens and padding: the loss covers completion tokens only.
Every problem is a :class:`DatasetError` naming the file, the line and the reason.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLE_ALIASES = {"developer": "system"}  # as the server's chat endpoint


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the file, line and reason."""


@dataclass(frozen=True)
class Example:
    """One tokenized training row. ``line`` is its 1-based line number in the source file."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    line: int

    @property
    def input_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.completion_ids]

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + list(self.completion_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


# ------------------------------------------------------------------------------------------ reading


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """``(line_number, object)`` for every non-blank line of a JSONL file.

    Raises :class:`DatasetError` for a missing/unreadable file, a line that is not JSON or not an
    object, and a file without any row.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc.strerror or exc}") from None
    rows: list[tuple[int, dict]] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path} line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path} line {number}: expected a JSON object with \"prompt\"/\"completion\" "
                               f"or \"messages\", got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise DatasetError(f"{path} is empty: expected one JSON object per line, with \"prompt\" and "
                           "\"completion\" or with \"messages\"")
    return rows


def _check_completion_row(row: dict) -> tuple[str, str]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if "completion" not in row:
        raise ValueError("has \"prompt\" but no \"completion\"")
    if "prompt" not in row:
        raise ValueError("has \"completion\" but no \"prompt\"")
    if not isinstance(prompt, str):
        raise ValueError(f"\"prompt\" must be a string, got {type(prompt).__name__}")
    if not isinstance(completion, str):
        raise ValueError(f"\"completion\" must be a string, got {type(completion).__name__}")
    if not completion:
        raise ValueError("\"completion\" is empty: there is nothing to learn")
    return prompt, completion


def _check_chat_row(row: dict) -> list[dict[str, str]]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with \"role\" and \"content\"")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] has no \"role\" string")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] \"content\" must be a string, got {type(content).__name__}")
        out.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's answer to learn, got role {out[-1]['role']!r}")
    if not out[-1]["content"]:
        raise ValueError("the last (assistant) message is empty: there is nothing to learn")
    return out


# ------------------------------------------------------------------------------------------ tokenizing


class Encoder:
    """Tokenizes rows exactly as the server tokenizes requests (see module doc).

    ``stop_ids``: token ids that end generation (the tokenizer's eos and the generation config's
    ``eos_token_id``); a target that does not already end in one gets ``eos_id`` appended.
    """

    def __init__(self, tokenizer: Any, stop_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DatasetError("the base model's tokenizer has no eos token; the trainer needs one to teach the "
                               "adapter where an answer ends")
        self.stop_ids = {int(self.eos_id), *(int(i) for i in stop_ids)}

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def _ends(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] in self.stop_ids else [*ids, int(self.eos_id)]

    def completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        return self._encode(prompt, True), self._ends(self._encode(completion, False))

    def chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("is a chat row but the base model's tokenizer has no chat template; use "
                             "\"prompt\"/\"completion\" rows")
        try:
            prompt_text = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full_text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # jinja2 errors, raise_exception() in the template
            raise ValueError(f"the chat template rejected the messages: {exc}") from None
        prompt = self._encode(prompt_text, False)
        if full_text.startswith(prompt_text) and len(full_text) > len(prompt_text):
            target = self._encode(full_text[len(prompt_text):], False)
        else:
            target = self._encode(messages[-1]["content"], False)
        return prompt, self._ends(target)

    def row(self, row: dict) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids) of one row; ``ValueError`` with the reason for a malformed row."""
        has_chat = "messages" in row
        has_completion = "prompt" in row or "completion" in row
        if has_chat and has_completion:
            raise ValueError("has both \"messages\" and \"prompt\"/\"completion\"; use one form per row")
        if has_chat:
            return self.chat(_check_chat_row(row))
        if has_completion:
            return self.completion(*_check_completion_row(row))
        keys = ", ".join(sorted(row)) or "none"
        raise ValueError(f"needs \"prompt\" and \"completion\", or \"messages\" (keys found: {keys})")


def load_examples(path: str | Path, tokenizer: Any, *, stop_ids: Iterable[int] = (),
                  max_length: int | None = None) -> list[Example]:
    """Read and tokenize a JSONL dataset; :class:`DatasetError` (with line numbers) on any problem.

    ``max_length``: the longest prompt + completion the model can take (tokens); longer rows are
    refused rather than silently truncated.
    """
    encoder = Encoder(tokenizer, stop_ids)
    examples = []
    for number, row in read_rows(path):
        try:
            prompt, target = encoder.row(row)
        except ValueError as exc:
            raise DatasetError(f"{path} line {number}: {exc}") from None
        if max_length is not None and len(prompt) + len(target) > max_length:
            raise DatasetError(f"{path} line {number}: {len(prompt) + len(target)} tokens (prompt + completion) "
                               f"exceed the model's limit of {max_length}; shorten the row")
        examples.append(Example(tuple(prompt), tuple(target), number))
    log.info("read %d examples from %s", len(examples), path)
    return examples


# ------------------------------------------------------------------------------------------ batching


def split_examples(examples: Sequence[Example], eval_fraction: float,
                   seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, eval) split: ``floor(len * eval_fraction)`` rows held out, chosen by ``seed``.

    At least one row always stays for training.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    n_eval = min(int(len(examples) * eval_fraction), len(examples) - 1)
    if n_eval <= 0:
        return list(examples), []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: Sequence[Example], batch_size: int, generator: torch.Generator | None) -> list[list[Example]]:
    """One epoch of batches; shuffled by ``generator`` (None keeps file order)."""
    order = (torch.randperm(len(examples), generator=generator).tolist() if generator is not None
             else list(range(len(examples))))
    return [[examples[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]
