"""Fair admission across tenants: the virtual token counter (Sheng et al., OSDI 2024). Pure Python.

Every tenant has a counter of the service it received: prompt tokens prefilled plus output tokens
decoded (weighted by ``OUTPUT_TOKEN_COST``), divided by the tenant's weight. When a batch row is
free, the waiting request of the tenant with the *smallest* counter goes first (FIFO within a
tenant), so a tenant that floods the queue only delays itself. A tenant that was idle re-enters at
the smallest counter among the tenants still waiting, so idling banks no credit. Requests without
a tenant are one tenant of their own (``NO_TENANT``).

The scheduler uses :class:`FairQueue` as its waiting queue; it behaves as a FIFO deque when only
one tenant waits, so single-tenant servers keep their order exactly. ``--admission fifo`` swaps in
:class:`ArrivalQueue` (plain arrival order across tenants: the control of ``make bench-tenants``);
``ADMISSION`` maps each choice to its queue and is the one list of choices.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

NO_TENANT = ""
OUTPUT_TOKEN_COST = 2.0  # an output token costs a decode step's share; a prompt token a prefill's (the paper's 1:2)


@dataclass(frozen=True)
class Tenant:
    """A tenant's terms: ``weight`` (its share of service) and its own bound on waiting requests."""
    name: str
    weight: float = 1.0
    max_waiting: int | None = None


class FairQueue:
    """The waiting requests, grouped by tenant; iteration and :meth:`popleft` follow the fair order.

    Requests need ``tenant`` (a :class:`Tenant` or None) and nothing else from this module.
    """

    def __init__(self) -> None:
        self._queues: dict[str, deque] = {}
        self._terms: dict[str, Tenant] = {}
        self.service: dict[str, float] = {}  # tenant name -> weighted tokens served (the virtual counter)

    # -- deque-like
    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return any(self._queues.values())

    def __contains__(self, request) -> bool:
        return any(request in q for q in self._queues.values())

    def __iter__(self) -> Iterator:
        """Every waiting request: tenants from the least served, each tenant's requests oldest first."""
        for name in sorted((n for n, q in self._queues.items() if q), key=lambda n: (self.service.get(n, 0.0), n)):
            yield from list(self._queues[name])

    def append(self, request) -> None:
        name = self.name_of(request)
        queue = self._queues.setdefault(name, deque())
        if not queue:  # (re)entering: no credit for the time it was idle
            self.service[name] = max(self.service.get(name, 0.0), self._floor(exclude=name))
        queue.append(request)
        if request.tenant is not None:
            self._terms[name] = request.tenant

    def appendleft(self, request) -> None:
        """Put a request back at the head of its tenant's queue (it was popped but could not be admitted)."""
        self._queues.setdefault(self.name_of(request), deque()).appendleft(request)

    def popleft(self):
        """The head of the queue of the waiting tenant with the least service; IndexError when empty."""
        waiting = [n for n, q in self._queues.items() if q]
        if not waiting:
            raise IndexError("pop from an empty FairQueue")
        name = min(waiting, key=lambda n: (self.service.get(n, 0.0), n))
        return self._queues[name].popleft()

    def remove(self, request) -> None:
        self._queues[self.name_of(request)].remove(request)

    # -- tenants
    def waiting_of(self, request) -> int:
        queue = self._queues.get(self.name_of(request))
        return len(queue) if queue else 0

    def charge(self, request, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Count service given to ``request``'s tenant: prompt tokens prefilled, output tokens decoded."""
        name = self.name_of(request)
        weight = request.tenant.weight if request.tenant is not None else 1.0
        cost = prompt_tokens + OUTPUT_TOKEN_COST * output_tokens
        self.service[name] = self.service.get(name, 0.0) + cost / weight

    @staticmethod
    def name_of(request) -> str:
        return request.tenant.name if request.tenant is not None else NO_TENANT

    def _floor(self, exclude: str) -> float:
        active = [self.service.get(n, 0.0) for n, q in self._queues.items() if q and n != exclude]
        return min(active, default=0.0)


class ArrivalQueue:
    """The waiting requests in plain arrival order, whatever their tenants (``--admission fifo``).

    The same interface as :class:`FairQueue`: it still counts each tenant's waiting requests (its own
    ``max_waiting``) and its service (``charge``), but never reorders by it.
    """

    def __init__(self) -> None:
        self._queue: deque = deque()
        self._waiting: dict[str, int] = {}
        self.service: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __contains__(self, request) -> bool:
        return request in self._queue

    def __iter__(self) -> Iterator:
        yield from list(self._queue)

    def append(self, request) -> None:
        self._queue.append(request)
        self._count(request, 1)

    def appendleft(self, request) -> None:
        self._queue.appendleft(request)
        self._count(request, 1)

    def popleft(self):
        request = self._queue.popleft()
        self._count(request, -1)
        return request

    def remove(self, request) -> None:
        self._queue.remove(request)
        self._count(request, -1)

    def waiting_of(self, request) -> int:
        return self._waiting.get(FairQueue.name_of(request), 0)

    charge = FairQueue.charge
    name_of = staticmethod(FairQueue.name_of)

    def _count(self, request, delta: int) -> None:
        name = FairQueue.name_of(request)
        self._waiting[name] = self._waiting.get(name, 0) + delta


ADMISSION = {"fair": FairQueue, "fifo": ArrivalQueue}  # --admission: the scheduler's waiting queue
DEFAULT_ADMISSION = "fair"


def waiting_queue(admission: str = DEFAULT_ADMISSION) -> FairQueue | ArrivalQueue:
    """The scheduler's waiting queue for an ``--admission`` choice; ValueError for an unknown one."""
    if admission not in ADMISSION:
        raise ValueError(f"unknown admission {admission!r}; choose one of {', '.join(ADMISSION)}")
    return ADMISSION[admission]()
