"""Offer load to a server: Poisson arrivals at a set rate, or a closed loop of concurrent users.

A run is a warm-up (``warmup`` seconds, results discarded) followed by the measured part,
bounded either by time (``duration`` seconds of offered load) or by count (``requests``
requests sent). A time-bounded part also waits for ``min_requests`` requests sent inside it:
in a closed loop a slow server may still be busy with the warm-up's requests when
``duration`` is over, and would otherwise have no request of its own measured.

Requests still running when the measured part ends are allowed to finish (up to
``drain_timeout``, then cancelled and counted as failed) so that their latencies count;
throughput counts only the tokens that arrived inside the measurement window.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from loadtest.client import Result, complete, new_client
from loadtest.workload import Workload, poisson_arrivals

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadConfig:
    mode: str = "closed"          # "closed" (concurrency users, back to back) or "poisson" (rate requests/s)
    concurrency: int = 32
    rate: float = 4.0
    duration: float | None = 20.0  # seconds of measured load ...
    requests: int | None = None    # ... or this many measured requests (takes precedence)
    min_requests: int = 0          # duration: go on past it until this many were sent (at most drain_timeout more)
    warmup: float = 3.0
    drain_timeout: float = 120.0
    stream: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("closed", "poisson"):
            raise ValueError("mode must be 'closed' or 'poisson'")
        if self.duration is None and self.requests is None:
            raise ValueError("give a duration or a number of requests")


@dataclass
class RunRecord:
    """The measured requests of one run and its measurement window (perf_counter seconds)."""

    results: list[Result] = field(default_factory=list)
    window_start: float = 0.0
    window_end: float = 0.0
    warmup_requests: int = 0
    warmup_results: list[Result] = field(default_factory=list)


class _Run:
    def __init__(self, url: str, workload: Workload, config: LoadConfig, base_model: str, on_window_start=None):
        self.url, self.workload, self.config, self.base_model = url, workload, config, base_model
        self.on_window_start = on_window_start
        self.record = RunRecord()
        self.sent = 0            # every request sent, warm-up included
        self.measured_sent = 0
        self.measuring = False
        self.stop_sending = False
        self.tasks: set[asyncio.Task] = set()
        self.end_at: float | None = None

    def _limit_reached(self) -> bool:
        c = self.config
        if c.requests is not None:
            return self.measuring and self.measured_sent >= c.requests
        if not self.measuring:
            return False
        now = time.perf_counter()
        return now >= self.end_at and (self.measured_sent >= c.min_requests or now >= self.end_at + c.drain_timeout)

    async def _one(self, client) -> Result | None:
        """Send the workload's next request; None (nothing sent) once the run has all it needs."""
        if self.stop_sending or (self.measuring and self.config.requests is not None
                                 and self.measured_sent >= self.config.requests):
            return None
        spec = self.workload.next()
        index, measured = self.sent, self.measuring
        self.sent += 1
        if measured:
            self.measured_sent += 1
        result = Result(index=index, adapter=spec.adapter, kind=spec.kind, sent=time.perf_counter())
        (self.record.results if measured else self.record.warmup_results).append(result)
        try:
            await complete(client, index, spec, self.base_model, stream=self.config.stream, result=result)
        except asyncio.CancelledError:
            result.error = result.error or "cancelled: still running when the drain timeout expired"
            raise
        if not result.ok:
            log.debug("request %d failed: %s", index, result.error)
        return result

    async def _closed_user(self, client) -> None:
        while not self.stop_sending:
            if await self._one(client) is None:
                return

    async def _poisson(self, client) -> None:
        c = self.config
        start = time.perf_counter()
        # enough arrivals for the warm-up plus the measured part (a count: at a third of the rate, plus slack)
        horizon = c.warmup + (c.duration if c.requests is None else c.requests / c.rate * 3 + 10)
        arrivals = poisson_arrivals(c.rate, max(1, int(horizon * c.rate * 1.5) + 16), seed=c.seed)
        for offset in arrivals:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stop_sending:
                return
            task = asyncio.ensure_future(self._one(client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        log.warning("ran out of precomputed arrivals")

    async def run(self) -> RunRecord:
        c = self.config
        async with new_client(self.url) as client:
            if c.mode == "closed":
                senders = [asyncio.ensure_future(self._closed_user(client)) for _ in range(c.concurrency)]
            else:
                senders = [asyncio.ensure_future(self._poisson(client))]
            try:
                await asyncio.sleep(c.warmup)
                if self.on_window_start is not None:
                    await self.on_window_start(client)
                self.measuring = True
                self.record.warmup_requests = self.sent
                self.record.window_start = time.perf_counter()
                if c.duration is not None:
                    self.end_at = self.record.window_start + c.duration
                while not self._limit_reached():
                    await asyncio.sleep(0.01)
                self.stop_sending = True
                if c.requests is None:
                    self.record.window_end = time.perf_counter()
                pending = [t for t in senders + list(self.tasks) if not t.done()]
                if pending:
                    _, not_done = await asyncio.wait(pending, timeout=c.drain_timeout)
                    for t in not_done:
                        t.cancel()
                    if not_done:
                        log.warning("%d requests still running %.0f s after the run ended: cancelled",
                                    len(not_done), c.drain_timeout)
                        await asyncio.gather(*not_done, return_exceptions=True)
            finally:
                for t in senders + list(self.tasks):
                    t.cancel()
        if c.requests is not None:
            finished = [r.done for r in self.record.results if r.done is not None]
            self.record.window_end = max(finished, default=self.record.window_start)
        return self.record


async def run_load(url: str, workload: Workload, config: LoadConfig, base_model: str,
                   on_window_start: Callable[[httpx.AsyncClient], Awaitable[None]] | None = None) -> RunRecord:
    """Drive the server at ``url`` with ``workload`` as ``config`` says; see the module docstring.

    ``on_window_start(client)`` is awaited as the measured part begins (e.g. to scrape metrics).
    """
    return await _Run(url, workload, config, base_model, on_window_start).run()
