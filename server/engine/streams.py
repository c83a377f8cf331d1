"""From the engine thread to asyncio: per-request output streams, delivered once per engine step.

The engine thread produces a RequestOutput per running request per step (32 at batch 32).
Waking the event loop for each (`call_soon_threadsafe` writes to the loop's self-pipe and
schedules a callback) costs a syscall and a loop iteration per token; instead each loop has a
`LoopMailbox` that collects the step's outputs and is woken once when the engine calls
`deliver()` at the end of the step.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

from server.engine.request import Request, RequestOutput


class LoopMailbox:
    """Outputs bound for one event loop's queues; `post` from any thread, `deliver` wakes the loop once."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, RequestOutput]] = []
        self._lock = threading.Lock()

    def post(self, target: asyncio.Queue, output: RequestOutput) -> None:
        with self._lock:
            self._items.append((target, output))

    def deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        if not items:
            return
        try:
            self.loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for target, output in items:
        target.put_nowait(output)


class QueuedOutputs:
    """Async iteration over ``self.queue`` (outputs, or an exception to raise, put by the stream's producer) until
    ``self.finished`` is set and the queue is drained: the streams of the remote engines (Ray replicas, vLLM)."""

    queue: asyncio.Queue
    finished: bool

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished and self.queue.empty():
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class RequestStream:
    """Async iterator over one request's outputs; closing it early aborts the request."""

    def __init__(self, request: Request, mailbox: LoopMailbox, abort: Callable[[str], None]):
        self.request = request
        self.mailbox = mailbox
        self._abort = abort
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def push(self, output: RequestOutput) -> None:  # engine thread
        self.mailbox.post(self.queue, output)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        output = await self.queue.get()
        self.finished = output.finished
        return output

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._abort(self.request.request_id)
