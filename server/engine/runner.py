"""The model runner: executes a step plan as forward passes over the paged KV cache, then samples.

Two kinds of forward per engine step:
- prefill: prompt chunks (right-padded to the longest, T tokens), each written through
  its request's block table after any prefix K/V and earlier chunks already there;
  logits of each chunk's last token only;
- decode: every decoding request feeds one token (T = 1), attending through its block
  table with a [B, 1, 1, L] mask that stops each row at its own length.

A request's block table [M] is its `block_ids` padded with the null block (0) to the
forward's widest row, so a padding token's K/V lands in the null block (or past its
row's length in its own last block, where its own later tokens overwrite it).

The adapter routing of each forward is set on entry and cleared on exit
(`AdapterPool.mapped`): nothing stays active between forwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.request import Request, TokenLogprob
from server.engine.sampling import RowSampling, sample, token_logprobs
from server.engine.block_manager import NULL_BLOCK
from server.engine.scheduler import PrefillChunk, StepPlan
from server.model.kv_cache import DEFAULT_BLOCK_SIZE, KVCache
from server.model.llama import FlatStep, StepInputs, Transformer


@dataclass(frozen=True)
class SampledToken:
    request: Request
    token_id: int
    logprob: TokenLogprob | None


@dataclass
class StepOutput:
    sampled: list[SampledToken] = field(default_factory=list)
    # per scored chunk: the logprobs of the prompt tokens it predicts (the first chunk's list starts with None)
    prompt_logprobs: list[tuple[Request, list[TokenLogprob | None]]] = field(default_factory=list)


@dataclass(frozen=True)
class _Part:
    """Rows of one forward group: ids [b][t] (padded), block tables [b, M], cache_pos/rope_pos [b, t], the
    row-major token indices whose logits are wanted, and each row's request (for adapter routing)."""

    ids: list[list[int]]
    tables: torch.Tensor
    cache_pos: torch.Tensor
    rope_pos: torch.Tensor
    wanted: list[int]
    requests: list | None


@contextmanager
def _mapped(adapters, requests):
    """The adapter routing of one forward, when the caller gave an adapter pool."""
    if adapters is None:
        yield
    else:
        with adapters.mapped(requests):
            yield


def _score_chunk(chunk: PrefillChunk, logits: torch.Tensor) -> list[TokenLogprob | None]:
    """logits [n, V] of the chunk's n tokens; token j's logits predict prompt token start_j + 1. The last
    chunk's last token predicts the first generated token, which is not a prompt token."""
    prompt = chunk.request.prompt_token_ids
    done = chunk.start - chunk.request.prefix_len          # prompt index of the chunk's first token
    targets = prompt[done + 1:done + 1 + len(chunk.token_ids)]
    entries: list[TokenLogprob | None] = [None] if chunk.first else []
    if targets:
        entries += token_logprobs(logits[:len(targets)], targets, chunk.request.params.prompt_logprobs)
    return entries


class ModelRunner:
    def __init__(self, model: Transformer, max_batch: int, max_seq_len: int, device: torch.device | str = "cpu",
                 cache_dtype: torch.dtype | None = None, num_blocks: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        """num_blocks: the pool's blocks (block 0 the null block); None: max_batch full-length rows and the
        null block."""
        args = model.args
        self.model = model
        self.device = torch.device(device)
        dtype = cache_dtype or model.model.embed_tokens.weight.dtype
        if num_blocks is None:
            num_blocks = max_batch * -(-max_seq_len // block_size) + 1
        self.cache = KVCache(args.num_layers, max_batch, args.num_kv_heads, max_seq_len, args.head_dim, dtype,
                             self.device, block_size=block_size, num_blocks=num_blocks)
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.sliding_window = args.sliding_window

    def _mask(self, cache_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[B, 1, T, L]: query at cache position p sees keys 0..p (and only the last window, if any)."""
        keys = torch.arange(kv_len, device=self.device)[None, None, None, :]
        query = cache_pos[:, None, :, None]
        mask = keys <= query
        if self.sliding_window:
            mask &= keys > query - self.sliding_window
        return mask

    @torch.inference_mode()
    def run(self, plan: StepPlan, adapters, sampling_of: Callable[[Request], RowSampling]) -> StepOutput:
        """Run the plan's prefill groups and decode rows, in one forward when there are several (the weights
        are read once per step: a prompt chunk beside decoding rows costs its compute, not a second pass over
        the weights); sample every row that decoded or finished its prompt this step (unless it asked for no
        tokens), and score prompt tokens where asked. `adapters` provides `mapped(requests)` and
        `prefix_for(request)`."""
        out = StepOutput()
        for group in plan.prefill:
            for chunk in group:
                # a prefix whose blocks came from the prefix cache is there already (the cache hit covers it)
                prefix = adapters.prefix_for(chunk.request) if chunk.first and not chunk.request.num_cache_hit else None
                if prefix is not None:
                    table = torch.tensor(chunk.request.block_ids, dtype=torch.long, device=self.device)
                    self.cache.write_prefix(table, *prefix)
        scored = [{i for i, c in enumerate(g) if c.request.params.prompt_logprobs is not None and not c.resumed}
                  for g in plan.prefill]
        parts = []
        for g, s in zip(plan.prefill, scored):
            starts = [c.start for c in g]
            t = max(len(c.token_ids) for c in g)
            tables = self._tables([c.request for c in g], max(starts) + t)
            parts.append(self._prefill_part(tables, [c.token_ids for c in g], starts, s, [c.request for c in g]))
        decode = plan.decode
        if decode is not None:
            tables = self._tables(decode.requests, max(decode.positions) + 1)
            parts.append(self._decode_part(tables, decode.token_ids, decode.positions, decode.requests))
        if not parts:
            return out
        blocks = self._forward(parts, adapters)  # [K_i, V] per part
        rows: list[Request] = []
        logits: list[torch.Tensor] = []  # [n, V] blocks, in `rows` order
        for group, group_scored, flat in zip(plan.prefill, scored, blocks):
            offset = 0
            for i, chunk in enumerate(group):
                n = len(chunk.token_ids) if i in group_scored else 1
                block, offset = flat[offset:offset + n], offset + n  # [n, V]
                if i in group_scored:
                    out.prompt_logprobs.append((chunk.request, _score_chunk(chunk, block)))
                if chunk.last and not chunk.resumed and chunk.request.params.max_tokens != 0:
                    rows.append(chunk.request)
                    logits.append(block[-1:])
        if decode is not None:
            block = blocks[-1]  # [B, V]
            keep = [i for i, s in enumerate(decode.sampled) if s]
            rows += [decode.requests[i] for i in keep]
            logits.append(block if len(keep) == len(decode.sampled) else block[keep])
        if rows:
            # one block (a pure decode step) is sampled as it is: cat would copy [B, V] for nothing
            tokens, logprobs = sample(logits[0] if len(logits) == 1 else torch.cat(logits), [sampling_of(r) for r in rows])
            out.sampled = [SampledToken(r, t, lp) for r, t, lp in zip(rows, tokens, logprobs)]
        return out

    def _tables(self, requests: list[Request], positions: int) -> torch.Tensor:
        """[B, M] the requests' block tables, wide enough for cache positions 0..positions-1, padded with
        the null block."""
        width = -(-positions // self.block_size)
        return torch.tensor([r.block_ids[:width] + [NULL_BLOCK] * (width - len(r.block_ids)) for r in requests],
                            dtype=torch.long, device=self.device)

    def _prefill_part(self, tables: torch.Tensor, prompts: list[list[int]], starts: list[int], every_token: set[int],
                      requests: list | None = None) -> _Part:
        """N prompts right-padded to the longest, T, written at cache positions starts[i].. through block
        tables [N, M] (M blocks cover starts[i] + T): a padding token's K/V lands past its row's length,
        where that row's own later tokens overwrite it before any query reads it, or in the null block
        (the mask stops every query at its own position). Logits are wanted of each prompt's last token,
        or of all its tokens if its index is in every_token."""
        t = max(len(p) for p in prompts)
        ids = [p + [0] * (t - len(p)) for p in prompts]
        cache_pos = torch.tensor(starts, dtype=torch.long, device=self.device)[:, None] + torch.arange(
            t, device=self.device)  # [N, T]
        wanted = [i * t + j for i, p in enumerate(prompts)
                  for j in (range(len(p)) if i in every_token else (len(p) - 1,))]
        return _Part(ids, tables, cache_pos, self._rope(cache_pos, requests), wanted, requests)

    def _rope(self, cache_pos: torch.Tensor, requests: list | None) -> torch.Tensor:
        """Rope positions [B, T] of tokens at cache positions [B, T]: the same, less each row's ``rope_shift``
        (a MAM prefix, whose prompt positions start at 0 after its P cache entries)."""
        shifts = [r.rope_shift for r in requests] if requests else []
        if not any(shifts):
            return cache_pos
        return cache_pos - torch.tensor(shifts, dtype=torch.long, device=self.device)[:, None]

    def _decode_part(self, tables: torch.Tensor, token_ids: list[int], positions: list[int],
                     requests: list | None = None, rope_positions: list[int] | None = None) -> _Part:
        """B rows (block tables [B, M]) feed one token each at their cache positions; logits of every row."""
        cache_pos = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]  # [B, 1]
        rope = (self._rope(cache_pos, requests) if rope_positions is None
                else torch.tensor(rope_positions, device=self.device)[:, None])
        return _Part([[t] for t in token_ids], tables, cache_pos, rope, list(range(len(token_ids))), requests)

    def _step_inputs(self, part: _Part, start: int = 0) -> StepInputs:
        kv_len = int(part.cache_pos.max()) + 1
        return StepInputs(self.cache, None, part.rope_pos, part.cache_pos, kv_len,
                          self._mask(part.cache_pos, kv_len), start=start, block_tables=part.tables)

    def _forward(self, parts: list[_Part], adapters=None) -> list[torch.Tensor]:
        """Logits [len(part.wanted), V] for each part: one padded [B, T] forward for a single part, else one
        flat [N, 1] forward whose attention runs per part (FlatStep)."""
        if len(parts) == 1:
            part = parts[0]
            ids = torch.tensor(part.ids, dtype=torch.long, device=self.device)
            index = torch.tensor(part.wanted, device=self.device)
            with _mapped(adapters, part.requests):
                return [self.model(ids, self._step_inputs(part), logits_index=index)]
        groups, wanted, requests, start = [], [], [], 0
        for part in parts:
            groups.append(self._step_inputs(part, start))
            wanted += [start + w for w in part.wanted]
            t = len(part.ids[0])
            requests += [r for r in part.requests for _ in range(t)]  # each token routed like its row
            start += len(part.ids) * t
        ids = torch.tensor([[tok] for part in parts for row in part.ids for tok in row], device=self.device)
        rope = torch.cat([part.rope_pos.reshape(-1, 1) for part in parts])  # [N, 1]
        with _mapped(adapters, requests):
            logits = self.model(ids, FlatStep(self.cache, rope, groups),
                                logits_index=torch.tensor(wanted, device=self.device))
        return list(logits.split([len(p.wanted) for p in parts]))

    @torch.inference_mode()
    def prefill(self, first_row: int, prompts: list[list[int]], starts: list[int],
                every_token: set[int] | frozenset[int] = frozenset(), requests: list | None = None) -> torch.Tensor:
        """Feed N prompts into cache rows first_row..first_row+N-1 (the pool's fixed row tables: the offline
        API, while the engine is not scheduling) in one forward (see `_prefill_part`); returns logits [K, V]:
        for each prompt in order, of its last token, or of all its tokens if its index is in every_token (so
        K = N when every_token is empty). The caller sets the adapter mapping; `requests` (optional, one per
        prompt) give the rows' rope shifts (Request.rope_shift)."""
        tables = self.cache.tables_of_rows(slice(first_row, first_row + len(prompts)))
        part = self._prefill_part(tables, prompts, starts, set(every_token))
        if requests:
            part = _Part(part.ids, part.tables, part.cache_pos, self._rope(part.cache_pos, requests), part.wanted, None)
        return self._forward([part])[0]

    @torch.inference_mode()
    def decode(self, token_ids: list[int], cache_positions: list[int], rope_positions: list[int] | None = None
               ) -> torch.Tensor:
        """Feed one token per row 0..B-1 (the pool's fixed row tables, as `prefill`); returns logits [B, V].
        The caller sets the mapping."""
        tables = self.cache.tables_of_rows(slice(0, len(token_ids)))
        return self._forward([self._decode_part(tables, token_ids, cache_positions,
                                                rope_positions=rope_positions)])[0]
