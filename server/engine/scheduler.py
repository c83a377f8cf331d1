"""Continuous-batching scheduler over the paged KV cache: what runs this step, as a plan of plain data
(pure Python, no torch).

Every running request holds a block table (`Request.block_ids`, from the `BlockManager`); `running` is in
admission order (oldest first) and `running[i]`'s chunks carry row i (the forwards group chunks of
consecutive rows). Each step:

1. full blocks computed by earlier steps are keyed into the prefix cache (`_commit`);
2. running requests, oldest first, reserve the blocks of this step's work: a prefill chunk (under the
   budget) or one decoded token. When the pool is out of blocks, the most recently admitted running
   request is preempted: its blocks are freed (its computed full blocks stay cached), it goes back to the
   front of the queue with its tokens, and when readmitted it recomputes prompt + outputs but the newest
   as a prompt (`Request.num_resumed`) whose last chunk samples nothing, then decodes on;
3. if nothing was preempted and no running prompt was held back, waiting requests are admitted in fair
   order (`fairness.FairQueue`: arrival order within a tenant, and across tenants the one with the least
   weighted service so far, the virtual token counter; one tenant, or none, is plain arrival order): each reuses the longest chain of cached blocks of its tokens (prefix caching), and is admitted
   when the rows, the prefill budget, the free blocks for its first chunk and `can_admit` all agree (the
   adapter pool uses it to hold a request until its adapter has a device slot; it raises
   `AdmissionFailed` when the request can never run). Admission stops at the first request that does not
   fit the budget or the blocks (so a long prompt is never overtaken for good); one held back by
   `can_admit` does not block the ones behind it.

Chunked prefill: a step prefills at most `prefill_budget` padded prompt tokens (chunks fed together are
padded to the longest). A prompt longer than what is left is cut into chunks, one per step, that
interleave with decode steps; the step's first chunk is always taken, cut to the budget.

A step's plan (`StepPlan`) holds:
- prefill: forwards, each a list of chunks on consecutive rows (`plan_prefill` splits where a padded row
  would run past the longest context);
- decode: the requests that feed one token each (their newest output);
- failed: requests that can never be admitted, with the client-facing message.

Rows whose prompt completes this step get their first token from the prefill logits and decode from the
next step on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from server.engine.block_manager import VIRTUAL, BlockManager, block_keys
from server.engine.fairness import DEFAULT_ADMISSION, waiting_queue
from server.engine.request import AdmissionFailed, QueueFull, Request, Status

DEFAULT_BLOCK_SIZE = 16  # cache positions per KV block (--kv-block-size): vLLM's default


@dataclass(frozen=True)
class PrefillChunk:
    request: Request
    row: int
    start: int              # cache position of the chunk's first token (after prefix K/V and earlier chunks)
    token_ids: list[int]
    first: bool             # the request's first chunk: its prefix K/V is written before it (unless cached)
    last: bool              # completes the prompt: the request's first token is sampled from its logits
    resumed: bool = False   # recomputes a preempted request that has outputs: its last chunk samples nothing
    #                         (the next token, its newest output, is known)


@dataclass(frozen=True)
class DecodeBatch:
    requests: list[Request]
    token_ids: list[int]     # [B] token fed per request
    positions: list[int]     # [B] cache position it is written to
    sampled: list[bool]      # [B] whether its logits are sampled (always, over the paged cache)


@dataclass
class StepPlan:
    prefill: list[list[PrefillChunk]] = field(default_factory=list)
    decode: DecodeBatch | None = None
    failed: list[tuple[Request, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.failed)


@dataclass
class CacheStats:
    """Counters since start (the engine turns them into Prometheus metrics)."""

    queried_tokens: int = 0   # prompt tokens looked up in the prefix cache at admission
    hit_tokens: int = 0       # of those, served from cached blocks
    preemptions: int = 0


def cache_tokens(request: Request, start: int, stop: int) -> list[int]:
    """The tokens at cache positions start..stop-1 as prefix-cache keys see them: VIRTUAL for the prefix's
    virtual tokens, then the prompt and the outputs."""
    p = request.prefix_len
    head = [VIRTUAL] * max(0, min(stop, p) - start)
    if stop <= p:
        return head
    lo, hi = max(start - p, 0), stop - p
    n = len(request.prompt_token_ids)
    body = request.prompt_token_ids[lo:hi] if hi <= n else (
        request.prompt_token_ids[lo:n] + request.output_token_ids[max(lo - n, 0):hi - n])
    return head + body


class Scheduler:
    def __init__(self, max_batch: int, max_waiting: int, can_admit: Callable[[Request], bool] | None = None,
                 prefill_budget: int | None = None, max_seq_len: int | None = None,
                 blocks: BlockManager | None = None, cache_salt: Callable[[Request], str] | None = None,
                 on_preempt: Callable[[Request], None] | None = None, admission: str = DEFAULT_ADMISSION):
        """blocks: the KV pool's bookkeeping (default: room for max_batch full-length rows, caching on);
        cache_salt: the identity of the weights a request's K/V are computed with (default: its adapter
        version); on_preempt: called with a request just preempted (the adapter pool frees its slot);
        admission: the waiting queue's order, fairness.ADMISSION (fair: the virtual token counter; fifo:
        arrival order)."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_budget = prefill_budget
        self.max_seq_len = max_seq_len
        self.can_admit = can_admit or (lambda request: True)
        if blocks is None:
            per_row = -(-(max_seq_len or 4096) // DEFAULT_BLOCK_SIZE)
            blocks = BlockManager(max_batch * per_row + 1, DEFAULT_BLOCK_SIZE)
        self.blocks = blocks
        self.cache_salt = cache_salt or (lambda request: request.adapter_version or "")
        self.on_preempt = on_preempt or (lambda request: None)
        self.epoch = 0
        self.stats = CacheStats()
        self.waiting = waiting_queue(admission)  # fair: FIFO within a tenant, across tenants least service first
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the queue holds {self.max_waiting} waiting requests; try again later")
        bound = request.tenant.max_waiting if request.tenant is not None else None
        if bound is not None and self.waiting.waiting_of(request) >= bound:
            raise QueueFull(f"this tenant's queue holds {bound} waiting requests; try again later")
        request.status = Status.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def row_of(self, request: Request) -> int:
        return self.running.index(request)

    def reset_prefix_cache(self) -> None:
        """The weights under the cache changed (e.g. an adapter merged into the base): drop every key, and
        never key blocks of requests admitted before now."""
        self.epoch += 1
        self.blocks.reset()

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        for request in self.running:
            self._commit(request)
        chunks = _Chunks(self.prefill_budget)
        decoding: list[Request] = []
        preempted = held = False
        i = 0
        while i < len(self.running):
            request = self.running[i]
            if request.prefilling:
                if held or not chunks.fits(request):
                    held = True
                    i += 1
                    continue
                need = request.prefix_len + request.num_computed + chunks.length(request)
            elif request.output_token_ids:
                need = request.num_tokens
            else:
                i += 1
                continue
            ok, victim = self._reserve(request, need)
            preempted |= victim
            if not ok:
                continue  # the request itself was preempted (it was the last row)
            if request.prefilling:
                chunks.take(request, i)
            else:
                decoding.append(request)
            i += 1
        if not preempted and not held:
            self._admit(chunks, plan)
        starts = [c.start for c in chunks.items]
        lengths = [len(c.token_ids) for c in chunks.items]
        limit = self.max_seq_len or max((s + n for s, n in zip(starts, lengths)), default=0)
        for run in _consecutive_rows(chunks.items):
            groups = plan_prefill([lengths[i] for i in run], [starts[i] for i in run], limit)
            plan.prefill += [[chunks.items[run[i]] for i in group] for group in groups]
        if decoding:
            plan.decode = DecodeBatch(decoding, [r.output_token_ids[-1] for r in decoding],
                                      [r.num_tokens - 1 for r in decoding], [True] * len(decoding))
            for request in decoding:  # the virtual token counter: each output token is service to its tenant
                self.waiting.charge(request, output_tokens=1)
        return plan

    def _reserve(self, request: Request, positions: int) -> tuple[bool, bool]:
        """Give the request blocks for `positions` cache positions, preempting the newest running requests
        while the pool is short. Returns (the request keeps running, something was preempted)."""
        missing = self.blocks.blocks_for(positions) - len(request.block_ids)
        preempted = False
        while missing > 0 and not self.blocks.can_allocate(missing):
            victim = self.running[-1]
            self._preempt(victim)
            preempted = True
            if victim is request:
                return False, True
        if missing > 0:
            request.block_ids += self.blocks.allocate(missing)
        return True, preempted

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._free(request)
        request.num_resumed = max(0, len(request.output_token_ids) - 1)
        request.num_computed = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.stats.preemptions += 1
        self.on_preempt(request)

    def _free(self, request: Request) -> None:
        """Key what it computed, then release its blocks."""
        self._commit(request)
        self.blocks.release(request.block_ids)
        request.block_ids, request.block_keys = [], []

    def _commit(self, request: Request) -> None:
        """Key the request's full blocks whose K/V are computed (by steps that have run)."""
        if not self.blocks.enable_caching or request.cache_epoch != self.epoch:
            return
        size, have = self.blocks.block_size, len(request.block_keys)
        full = min(request.num_cached // size, len(request.block_ids))
        if full <= have:
            return
        keys = block_keys(cache_tokens(request, have * size, full * size), size, request.cache_salt,
                          parent=request.block_keys[-1] if have else b"")
        for block, key in zip(request.block_ids[have:full], keys):
            self.blocks.register(block, key)
        request.block_keys += keys

    def _lookup(self, request: Request) -> tuple[list[int], list[bytes]]:
        """The cached blocks (and their keys) of the longest chain of the request's tokens, leaving at least
        one token to compute (its logits give the next token), and none inside a prefix's virtual tokens
        (those are written whole). Prompt-logprob requests compute every token."""
        if not self.blocks.enable_caching or request.params.prompt_logprobs is not None:
            return [], []
        size = self.blocks.block_size
        full = (request.prefix_len + request.num_fill - 1) // size
        keys = block_keys(cache_tokens(request, 0, full * size), size, request.cache_salt)
        hits = self.blocks.lookup(keys)
        if len(hits) * size < request.prefix_len:
            return [], []
        return hits, keys[:len(hits)]

    def _admit(self, chunks: "_Chunks", plan: StepPlan) -> None:
        """Admit waiting requests in fair order (fairness.FairQueue: the tenant with the least service first,
        charged the prompt tokens it will compute as it is admitted); those not admitted keep their places."""
        kept: list[Request] = []
        full = False
        while self.waiting:
            request = self.waiting.popleft()
            if full or len(self.running) >= self.max_batch:
                kept.append(request)
                continue
            request.cache_salt = self.cache_salt(request)
            hits, keys = self._lookup(request)
            hit = len(hits) * self.blocks.block_size
            request.num_computed = max(0, hit - request.prefix_len)
            if not chunks.fits(request):
                request.num_computed = 0
                full = bool(chunks.items)  # FIFO: nothing behind a prompt that did not fit is admitted this step
                kept.append(request)
                continue
            need = self.blocks.blocks_for(request.prefix_len + request.num_computed + chunks.length(request))
            if not self.blocks.can_allocate(need - len(hits), hits):
                request.num_computed = 0
                full = True
                kept.append(request)
                continue
            try:
                admitted = self.can_admit(request)
            except AdmissionFailed as exc:
                request.num_computed = 0
                request.status = Status.FINISHED
                plan.failed.append((request, str(exc)))
                continue
            if not admitted:
                request.num_computed = 0
                kept.append(request)
                continue
            self.blocks.take(hits)
            request.block_ids = hits + self.blocks.allocate(need - len(hits))
            request.block_keys = keys
            request.cache_epoch = self.epoch
            request.num_cache_hit = hit
            if request.params.prompt_logprobs is None:
                self.stats.queried_tokens += request.num_fill
                self.stats.hit_tokens += request.num_computed
            request.status = Status.RUNNING
            self.running.append(request)
            chunks.take(request, len(self.running) - 1)
            self.waiting.charge(request, prompt_tokens=request.num_fill - request.num_computed)
        for request in reversed(kept):
            self.waiting.appendleft(request)

    def remove(self, request: Request) -> None:
        """Take a request out (finished or aborted): its computed full blocks stay cached, its blocks free."""
        request.status = Status.FINISHED
        if request in self.waiting:
            self.waiting.remove(request)
            return
        if request in self.running:
            self.running.remove(request)
            self._free(request)


class _Chunks:
    """The step's prefill chunks under the padded-token budget (every chunk padded to the longest)."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self.items: list[PrefillChunk] = []
        self.longest = 0

    def fits(self, request: Request) -> bool:
        if not self.items or self.budget is None:
            return True
        return (len(self.items) + 1) * max(self.longest, request.prompt_remaining) <= self.budget

    def length(self, request: Request) -> int:
        """Tokens of the request's next chunk (whole, or cut to the budget if it is the step's first)."""
        remaining = request.prompt_remaining
        return remaining if self.budget is None else min(remaining, max(self.budget, 1))

    def take(self, request: Request, row: int) -> bool:
        """Schedule the request's next chunk (`length`)."""
        if not self.fits(request):
            return False
        remaining = request.prompt_remaining
        n = self.length(request)
        done = request.num_computed
        # resumed: a request with outputs was preempted; its next token is known even when it had just one (the
        # first, sampled by its prompt's last chunk: num_resumed is 0 then, and sampling again would repeat it)
        self.items.append(PrefillChunk(request, row, request.prefix_len + done, request.fill_token_ids(done, done + n),
                                       first=done == 0, last=n == remaining, resumed=bool(request.output_token_ids)))
        request.num_computed = done + n
        self.longest = max(self.longest, n)
        return True


def _consecutive_rows(chunks: list[PrefillChunk]) -> list[list[int]]:
    """Indices of chunks grouped into runs on consecutive rows (a forward covers a slice of rows)."""
    order = sorted(range(len(chunks)), key=lambda i: chunks[i].row)
    runs: list[list[int]] = []
    for i in order:
        if runs and chunks[runs[-1][-1]].row + 1 == chunks[i].row:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def plan_prefill(lengths: list[int], starts: list[int], max_seq_len: int) -> list[range]:
    """Split chunks on consecutive rows (already within the prefill budget) into forwards.

    Chunk i feeds lengths[i] tokens at cache positions starts[i].. . A forward pads
    every chunk to its longest, so a group grows while every row's padded end stays
    inside the cache. Returns consecutive index ranges covering all.
    """
    groups: list[range] = []
    first, longest, furthest_start = 0, 0, 0
    for i, (length, start) in enumerate(zip(lengths, starts)):
        grown_longest, grown_start = max(longest, length), max(furthest_start, start)
        if i > first and grown_start + grown_longest > max_seq_len:
            groups.append(range(first, i))
            first, grown_longest, grown_start = i, length, start
        longest, furthest_start = grown_longest, grown_start
    if lengths:
        groups.append(range(first, len(lengths)))
    return groups
