"""The model runner: turns scheduled requests into forward passes over the KV cache.

Two kinds of forward per engine step:
- prefill: one request's prompt, T tokens, written into its cache row after any
  prefix K/V already there; logits of the last token only;
- decode: every running row feeds its newest token (T = 1); rows are packed
  0..B-1 so the cache is read as a view, with a [B, 1, 1, L] mask that stops each
  row at its own length.
"""
from __future__ import annotations

import torch

from server.engine.scheduler import RowMove
from server.model.kv_cache import KVCache
from server.model.llama import StepInputs, Transformer


class ModelRunner:
    def __init__(self, model: Transformer, max_batch: int, max_seq_len: int, device: torch.device | str = "cpu",
                 cache_dtype: torch.dtype | None = None):
        args = model.args
        self.model = model
        self.device = torch.device(device)
        dtype = cache_dtype or model.model.embed_tokens.weight.dtype
        self.cache = KVCache(args.num_layers, max_batch, args.num_kv_heads, max_seq_len, args.head_dim, dtype,
                             self.device)
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
    def prefill(self, row: int, token_ids: list[int], start: int, rope_start: int | None = None) -> torch.Tensor:
        """Feed token_ids into cache row `row` at positions start..; returns last-token logits [V].

        rope_start: rope position of the first token if it differs from its cache position.
        """
        t = len(token_ids)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        cache_pos = torch.arange(start, start + t, device=self.device)[None]
        rope_pos = cache_pos if rope_start is None else cache_pos - start + rope_start
        step = StepInputs(self.cache, slice(row, row + 1), rope_pos, cache_pos, start + t,
                          self._mask(cache_pos, start + t))
        return self.model(ids, step, logits_index=torch.tensor([t - 1], device=self.device))[0]

    @torch.inference_mode()
    def decode(self, token_ids: list[int], cache_positions: list[int], rope_positions: list[int] | None = None
               ) -> torch.Tensor:
        """Feed one token per running row (rows 0..B-1); returns logits [B, V]."""
        b = len(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)[:, None]
        cache_pos = torch.tensor(cache_positions, dtype=torch.long, device=self.device)[:, None]
        rope_pos = cache_pos if rope_positions is None else torch.tensor(rope_positions, device=self.device)[:, None]
        kv_len = max(cache_positions) + 1
        step = StepInputs(self.cache, slice(0, b), rope_pos, cache_pos, kv_len, self._mask(cache_pos, kv_len))
        return self.model(ids, step, logits_index=torch.zeros(b, dtype=torch.long, device=self.device))

    def apply_moves(self, moves: list[RowMove]) -> None:
        for move in moves:
            self.cache.move_row(move.src, move.dst, move.length)
