"""Token sampling for a batch of rows with per-row parameters.

Every row draws its own uniform number from its own torch.Generator and picks a
token by inverse CDF over its processed distribution, so a seeded request gives
the same tokens whatever else shares its batch. Greedy rows take the argmax.
Logprobs are those of the model's raw distribution (log_softmax of the logits),
as the OpenAI API and vLLM report them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams, TokenLogprob


@dataclass
class RowSampling:
    params: SamplingParams
    generator: torch.Generator


def make_generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def _processed_probs(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted probabilities [N, V] after temperature, top-k and top-p, and the sorted token ids [N, V]."""
    temperature = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32, device=logits.device)
    sorted_logits, sorted_ids = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    vocab = logits.shape[-1]
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
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        index = torch.tensor(random_rows, device=logits.device)
        subset = [rows[i] for i in random_rows]
        probs, sorted_ids = _processed_probs(logits.index_select(0, index), subset)
        uniform = torch.cat([torch.rand(1, generator=r.generator) for r in subset]).to(logits.device)
        cdf = torch.cumsum(probs, dim=-1)
        picks = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)
        # left search: the first token whose cdf reaches u, so zero-probability tokens are never picked
        tokens[index] = sorted_ids.gather(1, picks).squeeze(1)
    token_list = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if wanted:
        log_probs = torch.log_softmax(logits[wanted], dim=-1)
        k = max(rows[i].params.logprobs for i in wanted)
        top_values, top_ids = log_probs.topk(max(k, 1), dim=-1)
        for j, i in enumerate(wanted):
            n = rows[i].params.logprobs
            logprobs[i] = TokenLogprob(
                token_id=token_list[i],
                logprob=float(log_probs[j, token_list[i]]),
                top=list(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist())),
            )
    return token_list, logprobs
