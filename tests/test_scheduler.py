"""The scheduler (pure Python): admission, packed rows, the per-step prefill budget, prefill grouping."""
import pytest

from server.engine.request import QueueFull, Request, SamplingParams, Status
from server.engine.scheduler import RowMove, Scheduler, plan_prefill


def requests(*lengths: int) -> list[Request]:
    return [Request(list(range(1, n + 1)), SamplingParams(max_tokens=4)) for n in lengths]


def admitted_per_step(scheduler: Scheduler, reqs: list[Request], steps: int) -> list[list[int]]:
    """Indices of the requests admitted at each step (nothing leaves in between)."""
    for r in reqs:
        scheduler.add(r)
    return [[reqs.index(r) for r in scheduler.schedule().admitted] for _ in range(steps)]


@pytest.mark.parametrize("lengths, max_batch, budget, expected", [
    ((3, 3, 3), 2, None, [[0, 1], [], []]),                 # rows bound admission
    ((10, 10, 10), 8, 25, [[0, 1], [2], []]),              # 2 x 10 fits 25, 3 x 10 does not
    ((10, 10, 10), 8, 30, [[0, 1, 2], [], []]),            # exactly the budget
    ((50, 5), 8, 16, [[0], [1], []]),                      # a prompt over the budget still runs, alone
    ((5, 50, 5), 8, 20, [[0], [1], [2]]),                  # in order: the short one never jumps the long one
    ((2, 2, 9), 8, 18, [[0, 1], [2], []]),                 # padding counts: 3 x 9 > 18
])
def test_admission_with_rows_and_prefill_budget(lengths, max_batch, budget, expected):
    scheduler = Scheduler(max_batch=max_batch, max_waiting=16, prefill_budget=budget)
    assert admitted_per_step(scheduler, requests(*lengths), len(expected)) == expected


def test_a_request_held_back_by_can_admit_does_not_block_the_rest():
    held = set()
    scheduler = Scheduler(max_batch=4, max_waiting=16, can_admit=lambda r: r.request_id not in held)
    reqs = requests(3, 3, 3)
    held.add(reqs[0].request_id)
    assert admitted_per_step(scheduler, reqs, 1) == [[1, 2]]
    assert reqs[0].status is Status.WAITING
    held.clear()
    assert [reqs.index(r) for r in scheduler.schedule().admitted] == [0]


def test_rows_stay_packed_when_a_request_leaves():
    scheduler = Scheduler(max_batch=4, max_waiting=16)
    reqs = requests(3, 4, 5)
    admitted_per_step(scheduler, reqs, 1)
    reqs[2].output_token_ids = [7, 8]
    assert scheduler.remove(reqs[0]) == [RowMove(src=2, dst=0, length=7)]
    assert scheduler.running == [reqs[2], reqs[1]]
    assert scheduler.remove(reqs[1]) == []  # the last row leaves: nothing moves
    assert reqs[0].status is Status.FINISHED


def test_queue_bound():
    scheduler = Scheduler(max_batch=1, max_waiting=2)
    for r in requests(1, 1):
        scheduler.add(r)
    with pytest.raises(QueueFull):
        scheduler.add(requests(1)[0])


@pytest.mark.parametrize("lengths, starts, max_seq_len, expected", [
    ([], [], 100, []),
    ([5], [0], 100, [(0, 1)]),
    ([4, 40, 4, 4], [0, 0, 0, 0], 100, [(0, 4)]),                # all padded ends fit: one forward
    ([3, 90], [8, 0], 96, [(0, 1), (1, 2)]),                    # 8 + 90 would pass the end of the cache
    ([3, 80], [8, 0], 96, [(0, 2)]),
    ([90, 3, 3], [0, 8, 0], 96, [(0, 1), (1, 3)]),              # the prefixed row goes with the short ones
    ([90, 3, 90, 3], [0, 8, 0, 8], 96, [(0, 1), (1, 2), (2, 3), (3, 4)]),
])
def test_plan_prefill(lengths, starts, max_seq_len, expected):
    groups = plan_prefill(lengths, starts, max_seq_len)
    assert [(g.start, g.stop) for g in groups] == expected
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) == 1 or max(starts[i] for i in group) + longest <= max_seq_len
