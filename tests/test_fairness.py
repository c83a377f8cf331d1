"""The virtual token counter as a pure-Python table: who gets the next free row."""
from dataclasses import dataclass

import pytest

from server.engine.fairness import OUTPUT_TOKEN_COST, FairQueue, Tenant

A, B, HEAVY = Tenant("a"), Tenant("b"), Tenant("heavy", weight=2.0)


@dataclass(eq=False)
class Req:
    name: str
    tenant: Tenant | None


def names(queue: FairQueue, pops: int | None = None) -> list[str]:
    out = []
    while queue and (pops is None or len(out) < pops):
        out.append(queue.popleft().name)
    return out


@pytest.mark.parametrize("arrivals, service, expected", [
    # one tenant (or none): FIFO, exactly as before tenants existed
    ([("a1", A), ("a2", A), ("a3", A)], {}, ["a1", "a2", "a3"]),
    ([("x1", None), ("x2", None)], {}, ["x1", "x2"]),
    # b, served less than a, goes before a's older requests
    ([("b1", B), ("a1", A), ("a2", A), ("b2", B)], {"a": 400}, ["b1", "b2", "a1", "a2"]),
    # a tenant arriving while only a is waiting starts level with a (no credit for idling): ties by name
    ([("a1", A), ("a2", A), ("b1", B)], {"a": 400}, ["a1", "a2", "b1"]),
    # equal service: ties go by tenant name, FIFO within each
    ([("b1", B), ("a1", A), ("b2", B)], {}, ["a1", "b1", "b2"]),
    # requests without a tenant are one tenant of their own
    ([("a1", A), ("x1", None)], {"a": 10}, ["x1", "a1"]),
])
def test_order_of_admission(arrivals, service, expected):
    queue = FairQueue()
    queue.service.update(service)
    for name, tenant in arrivals:
        queue.append(Req(name, tenant))
    assert [r.name for r in queue] == expected  # iteration shows the order popleft takes
    assert names(queue) == expected


def test_service_alternates_between_two_busy_tenants():
    """Each admission charges the tenant what its request costs, so two floods share rows turn by turn."""
    queue = FairQueue()
    for i in range(4):
        queue.append(Req(f"a{i}", A))
        queue.append(Req(f"b{i}", B))
    order = []
    while queue:
        request = queue.popleft()
        queue.charge(request, prompt_tokens=100)
        order.append(request.name[0])
    assert order == ["a", "b"] * 4


def test_weight_buys_a_proportional_share():
    queue = FairQueue()
    for i in range(6):
        queue.append(Req(f"h{i}", HEAVY))
        queue.append(Req(f"a{i}", A))
    order = []
    for _ in range(6):
        request = queue.popleft()
        queue.charge(request, output_tokens=50)
        order.append(request.name[0])
    assert order.count("h") == 4 and order.count("a") == 2  # weight 2 against 1
    assert queue.service == {"heavy": 4 * 50 * OUTPUT_TOKEN_COST / 2, "a": 2 * 50 * OUTPUT_TOKEN_COST}


def test_an_idle_tenant_banks_no_credit():
    """b was away while a was served 1,000 tokens: b re-enters at a's counter, so it does not get a
    1,000-token monopoly; it gets the next row and then they alternate."""
    queue = FairQueue()
    queue.append(Req("a0", A))
    queue.charge(queue.popleft(), prompt_tokens=1000)
    queue.append(Req("a1", A))
    for i in range(3):
        queue.append(Req(f"b{i}", B))
    assert queue.service["b"] == queue.service["a"] == 1000
    order = []
    while queue:
        request = queue.popleft()
        queue.charge(request, prompt_tokens=10)
        order.append(request.name)
    assert order == ["a1", "b0", "b1", "b2"]  # the tie at 1,000 goes by name


def test_remove_appendleft_and_counts():
    queue = FairQueue()
    first, second, other = Req("a1", A), Req("a2", A), Req("b1", B)
    for r in (first, second, other):
        queue.append(r)
    assert len(queue) == 3 and first in queue and queue.waiting_of(first) == 2 and queue.waiting_of(other) == 1
    queue.remove(second)
    assert second not in queue and len(queue) == 2
    popped = queue.popleft()
    queue.appendleft(popped)  # put back: still first in line
    assert queue.popleft() is popped
    with pytest.raises(IndexError):
        FairQueue().popleft()
