"""Token sampling for a batch of rows with per-row parameters.

Every row draws its own uniform number from its own torch.Generator and picks a
token by inverse CDF over its processed distribution, so a seeded request gives
the same tokens whatever else shares its batch. Greedy rows take the argmax.
Logprobs are those of the model's raw distribution (log_softmax of the logits),
as the OpenAI API and vLLM (its default, raw logprobs) report them.

What happens to a row's logits, in vLLM's order (v1 sampler: logits processors that can
change the argmax, then penalties, then greedy; temperature and min_p only for random rows):

1. min_tokens: while fewer than ``min_tokens`` tokens were generated, EOS (unless
   ``ignore_eos``) and ``stop_token_ids`` get -inf;
2. logit_bias: ``logit[t] += bias``;
3. repetition_penalty r over prompt and output tokens: ``logit > 0 ? logit / r : logit * r``;
4. frequency f and presence p over output tokens: ``logit -= f * count + p * (count > 0)``;
5. response_format: tokens the row's grammar forbids get -inf (server.engine.structured);
6. greedy rows: argmax here; random rows: temperature, then min_p (drop tokens whose
   probability is below ``min_p`` times the top one), top-k, top-p, then the draw.

Steps 1-4 run only on rows whose parameters ask for them (``SamplingParams.adjusts_logits``),
as batched tensor ops over those rows; a batch where no row asks pays nothing for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from server.engine.request import Request, SamplingParams, TokenLogprob
from server.engine.structured import advance, constrain


@dataclass
class RowSampling:
    """A request's sampling state for its whole life.

    ``request`` gives what steps 1, 3 and 4 read at every step: its ``prompt_token_ids`` and its
    ``output_token_ids`` (the live list the engine appends each sampled token to). Without it a row
    has no history: penalties see no tokens and min_tokens counts none generated.
    ``eos_token_ids``: the model's EOS ids, which min_tokens holds back (unless ``ignore_eos``).
    """

    params: SamplingParams
    generator: torch.Generator
    request: Request | None = None
    eos_token_ids: frozenset[int] = frozenset()
    matcher: object | None = None  # the row's grammar state (server.engine.structured), if constrained

    @property
    def prompt_ids(self) -> Sequence[int]:
        return self.request.prompt_token_ids if self.request is not None else ()

    @property
    def output_ids(self) -> Sequence[int]:
        return self.request.output_token_ids if self.request is not None else ()


def make_generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def _counts(histories: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each row's history: [N, V] float32 (ids outside [0, V) are ignored)."""
    width = max((len(h) for h in histories), default=0)
    counts = torch.zeros(len(histories), vocab + 1, dtype=torch.float32, device=device)
    if width:
        padded = torch.tensor([list(h) + [vocab] * (width - len(h)) for h in histories], dtype=torch.long)
        padded = padded.masked_fill_((padded < 0) | (padded > vocab), vocab).to(device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def _pairs(entries: list[tuple[int, int, float]], device: torch.device):
    rows, tokens, values = zip(*entries)
    return (torch.tensor(rows, device=device), torch.tensor(tokens, device=device),
            torch.tensor(values, dtype=torch.float32, device=device))


def _adjust_rows(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Steps 1-4 for every row of ``logits`` [N, V] (each row's own parameters); returns a new [N, V]."""
    n, vocab = logits.shape
    device = logits.device
    out = logits.clone()
    params = [r.params for r in rows]
    banned = []  # (row, token, -inf): min_tokens
    for i, (r, p) in enumerate(zip(rows, params)):
        if p.min_tokens and len(r.output_ids) < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
            banned += [(i, t, float("-inf")) for t in stops if 0 <= t < vocab]
    if banned:
        index_rows, index_tokens, values = _pairs(banned, device)
        out[index_rows, index_tokens] = values
    biases = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if 0 <= t < vocab]
    if biases:
        index_rows, index_tokens, values = _pairs(biases, device)
        out.index_put_((index_rows, index_tokens), values, accumulate=True)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _counts([list(r.prompt_ids) + list(r.output_ids) for r in rows], vocab, device) > 0
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
        penalty = torch.where(seen, penalty[:, None], torch.ones((), device=device))
        out = torch.where(out > 0, out / penalty, out * penalty)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        counts = _counts([r.output_ids for r in rows], vocab, device)
        frequency = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device)
        presence = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device)
        out = out - frequency[:, None] * counts - presence[:, None] * (counts > 0)
    return out


def adjusted_logits(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """``logits`` [B, V] after steps 1-4; the same tensor (no copy) when no row asks for any of them."""
    picked = [i for i, r in enumerate(rows) if r.params.adjusts_logits]
    if not picked:
        return logits
    if len(picked) == len(rows):
        return _adjust_rows(logits, rows)
    index = torch.tensor(picked, device=logits.device)
    return logits.index_copy(0, index, _adjust_rows(logits.index_select(0, index), [rows[i] for i in picked]))


def _processed_probs(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted probabilities [N, V] after temperature, min-p, top-k and top-p, and the sorted token ids [N, V]."""
    temperature = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32, device=logits.device)
    sorted_logits, sorted_ids = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    vocab = logits.shape[-1]
    if any(r.params.min_p for r in rows):
        min_p = torch.tensor([r.params.min_p for r in rows], dtype=torch.float32, device=logits.device)
        full = torch.softmax(sorted_logits, dim=-1)  # column 0 holds each row's top probability
        sorted_logits = sorted_logits.masked_fill(full < min_p[:, None] * full[:, :1], float("-inf"))
    top_k = torch.tensor([r.params.top_k or vocab for r in rows], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=logits.device)
    # keep a token if the mass strictly before it is below top_p (the first token always stays)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), sorted_ids


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] float32 -> one token id per row, and its logprobs where the row asked."""
    matchers = [r.matcher for r in rows]
    adjusted = constrain(adjusted_logits(logits, rows), matchers)
    tokens = torch.argmax(adjusted, dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        index = torch.tensor(random_rows, device=logits.device)
        subset = [rows[i] for i in random_rows]
        probs, sorted_ids = _processed_probs(adjusted.index_select(0, index), subset)
        uniform = torch.cat([torch.rand(1, generator=r.generator) for r in subset]).to(logits.device)
        cdf = torch.cumsum(probs, dim=-1)
        picks = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)
        # left search: the first token whose cdf reaches u, so zero-probability tokens are never picked
        tokens[index] = sorted_ids.gather(1, picks).squeeze(1)
    token_list = tokens.tolist()
    advance(matchers, token_list)
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if wanted:
        entries = token_logprobs(logits[wanted], [token_list[i] for i in wanted],
                                 [rows[i].params.logprobs for i in wanted])
        for i, entry in zip(wanted, entries):
            logprobs[i] = entry
    return token_list, logprobs


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top: int | list[int]) -> list[TokenLogprob]:
    """logits [N, V] (raw) -> for each row, the logprob of token_ids[n] and the `top` (per row, or one for
    all) most likely tokens with theirs, from log_softmax of the raw logits."""
    tops = [top] * len(token_ids) if isinstance(top, int) else top
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    chosen = log_probs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0].tolist()
    k = max(tops, default=0)
    top_values, top_ids = log_probs.topk(max(k, 1), dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(token_id=t, logprob=lp, top=list(zip(top_ids[n][:tops[n]], top_values[n][:tops[n]])))
            for n, (t, lp) in enumerate(zip(token_ids, chosen))]
