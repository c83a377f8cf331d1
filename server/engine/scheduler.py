"""Continuous-batching scheduler: what runs this step, as a plan of plain data (pure Python, no torch).

Running requests are packed: `running[i]` owns KV-cache row i. When a request
leaves, the last running request moves into its row, and the move is reported so
the runner can copy that row's cache (`RowMove`). Waiting requests are admitted
in arrival order whenever a row is free and `can_admit` agrees (the adapter pool
uses it to hold a request until its adapter has a device slot; it raises
`AdmissionFailed` when the request can never run, e.g. its adapter's files are
broken); a request that cannot be admitted yet does not block the ones behind it.

Chunked prefill: a step prefills at most `prefill_budget` padded prompt tokens
(chunks fed together are padded to the longest). A prompt longer than what is
left is cut into chunks, one per step, that interleave with decode steps, so a
long prompt never stalls the running rows for its whole prefill. Prompts already
being prefilled go first, then new admissions in FIFO order; admission stops at
the first request that does not fit (so a long prompt is never overtaken for
good); the step's first chunk is always taken, cut to the budget.

A step's plan (`StepPlan`) holds:
- prefill: forwards, each a list of chunks on consecutive rows (`plan_prefill`
  splits where a padded row would run past the cache end);
- decode: rows 0..B-1 fed one token each. B is one past the last row that has a
  token to decode; a row still in prefill below it gets a placeholder token at
  the position its next own token will overwrite, and is not sampled (so the
  decode forward keeps reading the cache as one contiguous view);
- failed: requests that can never be admitted, with the client-facing message.

Rows whose prompt completes this step get their first token from the prefill
logits and decode from the next step on.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from server.engine.request import AdmissionFailed, QueueFull, Request, Status


@dataclass(frozen=True)
class RowMove:
    src: int
    dst: int
    length: int  # cache positions to copy


@dataclass(frozen=True)
class PrefillChunk:
    request: Request
    row: int
    start: int              # cache position of the chunk's first token (after prefix K/V and earlier chunks)
    token_ids: list[int]
    first: bool             # the request's first chunk: its prefix K/V is written before it
    last: bool              # completes the prompt: the request's first token is sampled from its logits


@dataclass(frozen=True)
class DecodeBatch:
    requests: list[Request]  # rows 0..B-1
    token_ids: list[int]     # [B] token fed per row
    positions: list[int]     # [B] cache position it is written to
    sampled: list[bool]      # [B] False for placeholder rows (still in prefill)


@dataclass
class StepPlan:
    prefill: list[list[PrefillChunk]] = field(default_factory=list)
    decode: DecodeBatch | None = None
    failed: list[tuple[Request, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.failed)


class Scheduler:
    def __init__(self, max_batch: int, max_waiting: int, can_admit: Callable[[Request], bool] | None = None,
                 prefill_budget: int | None = None, max_seq_len: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_budget = prefill_budget
        self.max_seq_len = max_seq_len
        self.can_admit = can_admit or (lambda request: True)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the queue holds {self.max_waiting} waiting requests; try again later")
        request.status = Status.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def row_of(self, request: Request) -> int:
        return self.running.index(request)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        chunks = _Chunks(self.prefill_budget)
        for row, request in enumerate(self.running):  # prompts already being prefilled first
            if request.prefilling and not chunks.take(request, row):
                break
        else:
            self._admit(chunks, plan)
        starts = [c.start for c in chunks.items]
        lengths = [len(c.token_ids) for c in chunks.items]
        limit = self.max_seq_len or max((s + n for s, n in zip(starts, lengths)), default=0)
        for run in _consecutive_rows(chunks.items):
            groups = plan_prefill([lengths[i] for i in run], [starts[i] for i in run], limit)
            plan.prefill += [[chunks.items[run[i]] for i in group] for group in groups]
        plan.decode = self._decode_batch()
        return plan

    def _admit(self, chunks: "_Chunks", plan: StepPlan) -> None:
        kept: deque[Request] = deque()
        full = False
        while self.waiting:
            request = self.waiting.popleft()
            if not full and len(self.running) < self.max_batch and chunks.fits(request):
                try:
                    admitted = self.can_admit(request)
                except AdmissionFailed as exc:
                    request.status = Status.FINISHED
                    plan.failed.append((request, str(exc)))
                    continue
                if admitted:
                    request.status = Status.RUNNING
                    request.num_computed = 0
                    self.running.append(request)
                    chunks.take(request, len(self.running) - 1)
                    continue
            elif chunks.items and not chunks.fits(request):
                full = True  # FIFO: nothing behind a prompt that did not fit is admitted this step
            kept.append(request)
        self.waiting = kept

    def _decode_batch(self) -> DecodeBatch | None:
        decoding = [i for i, r in enumerate(self.running) if r.output_token_ids]
        if not decoding:
            return None
        rows = self.running[:decoding[-1] + 1]
        tokens, positions, sampled = [], [], []
        for request in rows:
            if request.output_token_ids:
                tokens.append(request.output_token_ids[-1])
                positions.append(request.num_tokens - 1)
                sampled.append(True)
            else:  # placeholder: its next prefill chunk (or its first decoded token) overwrites this position
                tokens.append(0)
                positions.append(request.prefix_len + request.num_computed)
                sampled.append(False)
        return DecodeBatch(rows, tokens, positions, sampled)

    def remove(self, request: Request) -> list[RowMove]:
        """Take a request out (finished or aborted); returns the row moves that keep rows packed."""
        request.status = Status.FINISHED
        if request in self.waiting:
            self.waiting.remove(request)
            return []
        row = self.running.index(request)
        last = len(self.running) - 1
        moved = self.running.pop()
        if row == last:
            return []
        self.running[row] = moved
        return [RowMove(src=last, dst=row, length=moved.num_cached)]


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

    def take(self, request: Request, row: int) -> bool:
        """Schedule the request's next chunk (whole, or cut to the budget if it is the step's first)."""
        if not self.fits(request):
            return False
        remaining = request.prompt_remaining
        n = remaining if self.budget is None else min(remaining, max(self.budget, 1))
        done = request.num_computed
        self.items.append(PrefillChunk(request, row, request.prefix_len + done,
                                       request.prompt_token_ids[done:done + n], first=done == 0, last=n == remaining))
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
