"""Structured output (`response_format`): per-row grammar masks in the batched sampling step, with xgrammar.

A request's `SamplingParams.response_format` is the canonical JSON of OpenAI's field:
`{"type": "json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema":
{"name": ..., "schema": {...}, "strict": ...}}`. `Grammars.compile` turns it into an
xgrammar `CompiledGrammar` once per distinct format (cached, LRU) — on the caller's thread, so a
bad schema is a 400 before the request is queued — and each request gets its own
`GrammarMatcher` (its parse state). At every step the sampler asks each constrained row's
matcher for its allowed-token bitmask [rows, ceil(V/32)] int32, sets every other token's logit
to -inf (xgrammar's CPU/CUDA kernel), samples, and advances the matcher by the chosen token.
Unconstrained rows are untouched, and a batch with no constrained row does no grammar work.
When the grammar is complete only EOS stays allowed, and the row ends (`finished`).

Why xgrammar and not llguidance (both on PyPI, both wheels for this CPU): the mask computation
per row per step is what every constrained step pays. `loadtest/bench_structured.py`
measures both on the default model's tokenizer (49152 tokens); see docs/BENCHMARKS.md.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch

from server.engine.request import RequestError, canonical_response_format  # noqa: F401 (re-exported)

MAX_WHITESPACE = 2  # consecutive whitespace characters allowed between JSON tokens
# xgrammar 0.2.9 writes the characters of a length-bounded string (maxLength/minLength) as [^"\\\r\n],
# which lets raw control characters (U+0000-U+001F, tab included) into a string: invalid JSON, refused
# by strict parsers (seen: "RͦkMc\x0e\x10\x1b"). Its unbounded strings already exclude them; so do we.
_LENIENT_CHARS, _STRICT_CHARS = r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]'
_XGR_PREFIX = re.compile(r"^\[[\d:.]+\]\s+\S+:\d+:\s*")


class Grammars:
    """Compiles response formats for one tokenizer (xgrammar), caching the compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int], cache_size: int = 64):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, stop_token_ids
        self.cache_size = cache_size
        self._compiler = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def _xgr(self):
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=sorted(self.stop_token_ids) or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return xgr

    def compile(self, response_format: str):
        """The compiled grammar of a canonical response format; RequestError naming what is unsupported."""
        with self._lock:
            if response_format in self._cache:
                self._cache.move_to_end(response_format)
                return self._cache[response_format]
            xgr = self._xgr()
            spec = json.loads(response_format)
            try:
                schema = {"type": "object"} if spec["type"] == "json_object" else spec["schema"]
                # Whitespace between tokens is bounded: with any amount allowed, a model can loop on
                # newlines forever inside valid JSON (the tiny test model did, from its 4th token).
                ebnf = str(xgr.Grammar.from_json_schema(json.dumps(schema), strict_mode=True,
                                                        max_whitespace_cnt=MAX_WHITESPACE))
                grammar = self._compiler.compile_grammar(ebnf.replace(_LENIENT_CHARS, _STRICT_CHARS))
            except (RuntimeError, ValueError, TypeError) as exc:
                reason = _XGR_PREFIX.sub("", str(exc)).strip()  # "[12:57:50] /project/cpp/x.cc:5082: Unsupported..."
                raise RequestError(f"response_format json_schema is not supported: {reason}") from None
            self._cache[response_format] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return grammar

    @staticmethod
    def matcher(grammar):
        import xgrammar as xgr

        return xgr.GrammarMatcher(grammar)


def constrain(logits: torch.Tensor, matchers: list) -> torch.Tensor:
    """logits [N, V] with every token a row's grammar forbids at -inf (rows whose matcher is None untouched).

    Returns `logits` itself when no row is constrained, else a masked copy.
    """
    picked = [i for i, m in enumerate(matchers) if m is not None]
    if not picked:
        return logits
    import xgrammar as xgr

    out = logits.clone()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(logits), vocab)  # [N, ceil(V/32)] int32, all allowed
    for i in picked:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(out, bitmask.to(out.device), vocab_size=vocab, indices=picked)
    return out


def advance(matchers: list, tokens: list[int]) -> None:
    """Feed each constrained row's chosen token to its matcher."""
    for matcher, token in zip(matchers, tokens):
        if matcher is not None and not matcher.is_terminated():
            if not matcher.accept_token(token):
                raise RuntimeError(f"the grammar refused token {token} that its own mask allowed")
