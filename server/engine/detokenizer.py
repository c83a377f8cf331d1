"""Incremental detokenization with stop strings (pure Python; the tokenizer is a HF tokenizer).

Text is released only when it is final: a trailing U+FFFD (an incomplete UTF-8
sequence from a byte-level tokenizer) is held back, and so is any tail that could
still become a stop string, so a stream never shows text past a stop.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""          # all final text so far (stop string excluded)
        self.emitted = 0        # characters of self.text already returned
        self.stopped = False

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the newly releasable text. Sets `stopped` on a stop string."""
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hold = 0
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                text, self.stopped, final = text[:at], True, True
                break
        if not final:
            # Incomplete characters (trailing U+FFFD) are held back, and so is a tail *before* them that
            # could start a stop string: the character may complete the stop at the next token.
            body = text.rstrip("\ufffd")
            pending = hold = len(text) - len(body)
            for stop in self.stop:
                for n in range(min(len(stop) - 1, len(body)), 0, -1):
                    if body.endswith(stop[:n]):
                        hold = max(hold, pending + n)
                        break
        self.text = text
        end = len(text) - hold
        if end <= self.emitted:
            return ""
        delta = text[self.emitted:end]
        self.emitted = end
        return delta


class TokenizerText:
    """``encode`` / ``decode`` of the engine contract over ``self.tokenizer`` (a HF tokenizer): the prompt with the
    model's special tokens (BOS), outputs without them. Shared by Engine and the remote engine clients."""

    tokenizer: object

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
