"""Continuous-batching scheduler: which requests run this step (pure Python, no torch).

Running requests are packed: `running[i]` owns KV-cache row i. When a request
leaves, the last running request moves into its row, and the move is reported so
the runner can copy that row's cache (`RowMove`). Waiting requests are admitted
in arrival order whenever a row is free and `can_admit` agrees (the adapter pool
uses it to hold a request until its adapter has a device slot); a request that
cannot be admitted yet does not block the ones behind it.

Prompts admitted in one step are prefilled before that step's decode, so their
padded size (rows x longest prompt) is bounded by `prefill_budget`: once the next
request would exceed it, admission stops for this step (in order, so a long prompt
is never overtaken for good); the first request of a step is always admitted.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from server.engine.request import QueueFull, Request, Status


@dataclass(frozen=True)
class RowMove:
    src: int
    dst: int
    length: int  # cache positions to copy


@dataclass
class ScheduledStep:
    admitted: list[Request] = field(default_factory=list)  # need prefill, rows already assigned
    running: list[Request] = field(default_factory=list)   # all rows after admission, row i = running[i]


class Scheduler:
    def __init__(self, max_batch: int, max_waiting: int, can_admit: Callable[[Request], bool] | None = None,
                 prefill_budget: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_budget = prefill_budget
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

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        free = self.max_batch - len(self.running)
        if free and self.waiting:
            kept: deque[Request] = deque()
            longest, budget_spent = 0, False
            while self.waiting:
                request = self.waiting.popleft()
                if free and not budget_spent:
                    length = max(longest, len(request.prompt_token_ids))
                    if (step.admitted and self.prefill_budget is not None
                            and (len(step.admitted) + 1) * length > self.prefill_budget):
                        budget_spent = True
                    elif self.can_admit(request):
                        request.status = Status.RUNNING
                        self.running.append(request)
                        step.admitted.append(request)
                        free -= 1
                        longest = length
                        continue
                kept.append(request)
            self.waiting = kept
        step.running = list(self.running)
        return step

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
        return [RowMove(src=last, dst=row, length=moved.num_tokens)]


def plan_prefill(lengths: list[int], starts: list[int], max_seq_len: int) -> list[range]:
    """Split the prompts admitted in one step (already within the prefill budget) into forwards.

    Request i feeds lengths[i] prompt tokens after starts[i] cached positions (a
    prefix adapter's K/V). A forward pads every prompt to its longest, so a group
    grows while every row's padded end stays inside the cache. Returns consecutive
    index ranges covering all.
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
