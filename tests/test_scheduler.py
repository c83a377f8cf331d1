"""The scheduler (pure Python): admission, chunked prefill under the budget, decode rows, blocks, preemption."""
import pytest

from server.engine.request import AdmissionFailed, QueueFull, Request, SamplingParams, Status
from server.engine.block_manager import BlockManager
from server.engine.fairness import Tenant
from server.engine.scheduler import Scheduler, plan_prefill


def requests(*lengths: int) -> list[Request]:
    return [Request(list(range(1, n + 1)), SamplingParams(max_tokens=4)) for n in lengths]


def chunks_per_step(scheduler: Scheduler, reqs: list[Request], steps: int) -> list[list[tuple[int, int]]]:
    """(request index, chunk length) of every prefill chunk at each step (nothing leaves in between)."""
    for r in reqs:
        scheduler.add(r)
    return [[(reqs.index(c.request), len(c.token_ids)) for group in scheduler.schedule().prefill for c in group]
            for _ in range(steps)]


@pytest.mark.parametrize("lengths, max_batch, budget, expected", [
    ((3, 3, 3), 2, None, [[(0, 3), (1, 3)], [], []]),                   # rows bound admission
    ((10, 10, 10), 8, 25, [[(0, 10), (1, 10)], [(2, 10)], []]),         # 2 x 10 fits 25, 3 x 10 does not
    ((10, 10, 10), 8, 30, [[(0, 10), (1, 10), (2, 10)], [], []]),       # exactly the budget
    ((50, 5), 8, 16, [[(0, 16)], [(0, 16)], [(0, 16)], [(0, 2), (1, 5)], []]),  # chunks; the short one joins last
    ((5, 50, 5), 8, 20, [[(0, 5)], [(1, 20)], [(1, 20)], [(1, 10), (2, 5)]]),  # FIFO: never jumps the long one
    ((2, 2, 9), 8, 18, [[(0, 2), (1, 2)], [(2, 9)], []]),               # padding counts: 3 x 9 > 18
    ((7,), 8, 1, [[(0, 1)]] * 7 + [[]]),                                 # one token per step
])
def test_chunked_prefill_under_the_budget(lengths, max_batch, budget, expected):
    scheduler = Scheduler(max_batch=max_batch, max_waiting=16, prefill_budget=budget)
    assert chunks_per_step(scheduler, requests(*lengths), len(expected)) == expected


def test_chunks_are_contiguous_and_flag_first_and_last():
    scheduler = Scheduler(max_batch=2, max_waiting=4, prefill_budget=4)
    (request,) = requests(10)
    request.prefix_len = 3
    scheduler.add(request)
    chunks = [c for _ in range(3) for group in scheduler.schedule().prefill for c in group]
    assert [(c.start, c.token_ids, c.first, c.last) for c in chunks] == [
        (3, [1, 2, 3, 4], True, False), (7, [5, 6, 7, 8], False, False), (11, [9, 10], False, True)]


def test_decode_rows_beside_a_prompt_still_in_prefill():
    """Only requests with a token to feed decode; a prompt still in prefill takes its chunk instead."""
    scheduler = Scheduler(max_batch=4, max_waiting=4, prefill_budget=4)
    short, long_, other = requests(3, 10, 2)
    for r in (short, long_):
        scheduler.add(r)
    scheduler.schedule()                         # short: whole prompt (3); long: nothing fits beside it
    short.output_token_ids = [42]
    plan = scheduler.schedule()                  # long's first chunk beside short's decode
    assert [(c.request, c.start, len(c.token_ids)) for g in plan.prefill for c in g] == [(long_, 0, 4)]
    assert plan.decode.requests == [short] and plan.decode.positions == [3] and plan.decode.token_ids == [42]
    short.output_token_ids.append(43)
    plan = scheduler.schedule()
    assert plan.decode.requests == [short] and plan.decode.sampled == [True] and plan.decode.positions == [4]
    assert [(c.row, c.start) for g in plan.prefill for c in g] == [(1, 4)]
    scheduler.add(other)
    assert scheduler.row_of(long_) == 1 and other.status is Status.WAITING


def test_a_request_that_can_never_be_admitted_is_reported_failed():
    def can_admit(request):
        if request.prompt_token_ids[0] == 9:
            raise AdmissionFailed("broken adapter")
        return True

    scheduler = Scheduler(max_batch=4, max_waiting=4, can_admit=can_admit)
    good, bad = requests(2)[0], Request([9, 9], SamplingParams())
    scheduler.add(bad)
    scheduler.add(good)
    plan = scheduler.schedule()
    assert plan.failed == [(bad, "broken adapter")] and bad.status is Status.FINISHED
    assert scheduler.running == [good] and not scheduler.waiting


def test_a_request_held_back_by_can_admit_does_not_block_the_rest():
    held = set()
    scheduler = Scheduler(max_batch=4, max_waiting=16, can_admit=lambda r: r.request_id not in held)
    reqs = requests(3, 3, 3)
    held.add(reqs[0].request_id)
    assert chunks_per_step(scheduler, reqs, 1) == [[(1, 3), (2, 3)]]
    assert reqs[0].status is Status.WAITING
    held.clear()
    plan = scheduler.schedule()
    assert [(c.request, c.row) for group in plan.prefill for c in group] == [(reqs[0], 2)]


def test_rows_keep_admission_order_and_blocks_come_back():
    scheduler = Scheduler(max_batch=4, max_waiting=16, blocks=BlockManager(16, 4))
    reqs = requests(3, 4, 5)
    chunks_per_step(scheduler, reqs, 1)
    assert [len(r.block_ids) for r in reqs] == [1, 1, 2] and scheduler.blocks.num_used == 4
    reqs[2].output_token_ids = [7, 8]
    scheduler.remove(reqs[0])
    assert scheduler.running == [reqs[1], reqs[2]] and reqs[0].status is Status.FINISHED
    assert reqs[0].block_ids == [] and scheduler.blocks.num_used == 3


def test_blocks_grow_with_decoding():
    scheduler = Scheduler(max_batch=2, max_waiting=4, blocks=BlockManager(8, 4))
    (request,) = requests(4)
    scheduler.add(request)
    scheduler.schedule()
    assert len(request.block_ids) == 1
    for n in range(1, 6):                        # position 4 (the 5th) needs a second block
        request.output_token_ids.append(n)
        plan = scheduler.schedule()
        assert plan.decode.positions == [3 + n]
        assert len(request.block_ids) == 1 + (3 + n) // 4


def test_admission_waits_for_free_blocks():
    scheduler = Scheduler(max_batch=4, max_waiting=4, blocks=BlockManager(4, 4))  # 3 usable blocks
    first, second = requests(8, 8)
    scheduler.add(first)
    scheduler.add(second)
    scheduler.schedule()
    assert scheduler.running == [first] and list(scheduler.waiting) == [second]
    scheduler.remove(first)
    scheduler.schedule()
    assert scheduler.running == [second]


def test_the_newest_request_is_preempted_and_resumes_with_its_tokens():
    scheduler = Scheduler(max_batch=4, max_waiting=4, blocks=BlockManager(5, 4))  # 4 usable blocks
    old, new = requests(7, 7)
    scheduler.add(old)
    scheduler.add(new)
    scheduler.schedule()                          # 2 blocks each: the pool is full
    old.output_token_ids, new.output_token_ids = [50], [60]
    plan = scheduler.schedule()                   # position 7 fits in block 1 for both
    assert plan.decode.requests == [old, new]
    old.output_token_ids.append(51)
    new.output_token_ids.append(61)
    plan = scheduler.schedule()                   # old needs a third block: new is preempted
    assert plan.decode.requests == [old] and scheduler.stats.preemptions == 1
    assert list(scheduler.waiting) == [new] and new.block_ids == [] and new.num_resumed == 1
    assert new.prefilling and new.prompt_remaining == 8  # prompt + its first output, recomputed
    scheduler.remove(old)
    plan = scheduler.schedule()
    (chunk,) = [c for g in plan.prefill for c in g]
    # its first block is found in the prefix cache (the same prompt as old's); the rest is recomputed
    assert chunk.request is new and chunk.start == 4 and chunk.token_ids == [5, 6, 7, 60]
    assert chunk.last and chunk.resumed and plan.decode is None
    plan = scheduler.schedule()                   # then it decodes its newest token at its position
    assert plan.decode.requests == [new] and plan.decode.token_ids == [61] and plan.decode.positions == [8]


def test_a_request_preempted_right_after_its_prompt_resumes_without_sampling_its_first_token_again():
    """can_admit holds the first request back once (its adapter slot still being written), so the second is
    admitted first and the first becomes the newest row: preempted in the step after its prompt sampled its
    only output. Readmitted, its prompt is recomputed but its last chunk samples nothing (the first token is
    known); it then feeds that token at the position after the prompt."""
    refused: set[Request] = set()

    def can_admit(request: Request) -> bool:
        if request is first and request not in refused:
            refused.add(request)
            return False
        return True

    scheduler = Scheduler(max_batch=4, max_waiting=4, can_admit=can_admit,
                          blocks=BlockManager(5, 4))  # 4 usable blocks
    first, second = (Request(list(range(start, start + 7)), SamplingParams(max_tokens=4)) for start in (11, 1))
    scheduler.add(first)
    scheduler.add(second)
    plan = scheduler.schedule()
    assert [c.request for g in plan.prefill for c in g] == [second] and list(scheduler.waiting) == [first]
    second.output_token_ids = [60]
    plan = scheduler.schedule()                   # first is admitted now: a row after second's
    assert scheduler.running == [second, first] and plan.decode.requests == [second]
    (chunk,) = [c for g in plan.prefill for c in g]
    assert chunk.request is first and chunk.last and not chunk.resumed  # samples first's first token
    second.output_token_ids.append(61)
    first.output_token_ids = [50]                 # the token its last chunk sampled
    plan = scheduler.schedule()
    # second needs a third block: first (the newest row, holding just that one output) is preempted
    assert plan.decode.requests == [second] and scheduler.stats.preemptions == 1
    assert list(scheduler.waiting) == [first] and first.output_token_ids == [50]
    scheduler.remove(second)
    plan = scheduler.schedule()
    chunks = [c for g in plan.prefill for c in g]
    assert chunks[-1].request is first and chunks[-1].last
    assert all(c.resumed for c in chunks)          # its first token is known: nothing is sampled again
    assert [t for c in chunks for t in c.token_ids][-3:] == [15, 16, 17] and plan.decode is None
    plan = scheduler.schedule()                    # then it feeds that token at the position after the prompt
    assert plan.decode.requests == [first] and plan.decode.token_ids == [50] and plan.decode.positions == [7]


def test_prefix_cache_hits_skip_computed_blocks():
    scheduler = Scheduler(max_batch=4, max_waiting=4, blocks=BlockManager(16, 4))
    first = Request(list(range(1, 11)), SamplingParams(max_tokens=4))
    scheduler.add(first)
    scheduler.schedule()
    first.output_token_ids = [99]
    scheduler.remove(first)                       # its 2 full blocks stay cached
    same, other_adapter, logprobs = (Request(list(range(1, 11)), SamplingParams(max_tokens=4)) for _ in range(3))
    other_adapter.adapter_version = "a@1"
    logprobs.params = SamplingParams(max_tokens=4, prompt_logprobs=0)
    for r in (same, other_adapter, logprobs):
        scheduler.add(r)
    plan = scheduler.schedule()
    starts = {c.request: c.start for g in plan.prefill for c in g}
    assert starts == {same: 8, other_adapter: 0, logprobs: 0}
    assert same.num_cache_hit == 8 and len(set(same.block_ids) & set(other_adapter.block_ids)) == 0
    assert same.num_cached_prompt_tokens == 8 and other_adapter.num_cached_prompt_tokens == 0
    assert scheduler.stats.hit_tokens == 8 and scheduler.stats.queried_tokens == 30  # first, same, other


def test_a_whole_cached_prompt_still_computes_its_last_token():
    scheduler = Scheduler(max_batch=4, max_waiting=4, blocks=BlockManager(16, 4))
    first, again = requests(8, 8)
    scheduler.add(first)
    scheduler.schedule()
    scheduler.remove(first)
    scheduler.add(again)
    (chunk,) = [c for g in scheduler.schedule().prefill for c in g]
    assert chunk.start == 4 and chunk.token_ids == [5, 6, 7, 8]


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


# ---- fair admission across tenants (fairness.FairQueue inside the scheduler)

def tenant_requests(tenant, n: int, length: int = 8) -> list[Request]:
    reqs = requests(*[length] * n)
    for r in reqs:
        r.tenant = tenant
    return reqs


def admission_order(scheduler: Scheduler, steps: int, out_tokens: int) -> list[str]:
    """Run `steps` steps; each admitted request decodes `out_tokens` tokens then leaves. Returns the admitted
    requests' tenant names, in admission order."""
    order, seen = [], set()
    for _ in range(steps):
        plan = scheduler.schedule()
        for request in list(scheduler.running):
            if id(request) not in seen:
                seen.add(id(request))
                order.append(request.tenant.name if request.tenant else "-")
            if not request.prefilling:
                request.output_token_ids.append(1)
                if len(request.output_token_ids) >= out_tokens:
                    scheduler.remove(request)
        assert plan is not None
    return order


@pytest.mark.parametrize("flood, trickle, expected", [
    # a flood of A queued first, B's 3 requests after it: FIFO would admit B 9th-11th; fair, B goes next
    ((Tenant("a"), 8), (Tenant("b"), 3), ["a", "b", "a", "b", "a", "b", "a", "a", "a", "a", "a"]),
    # weight 3 for A: A gets about 3 rows per B row while both wait
    ((Tenant("a", weight=3.0), 8), (Tenant("b"), 3), ["a", "b", "a", "a", "a", "b", "a", "a", "a", "b", "a"]),
    # requests without a tenant are one tenant of their own
    ((None, 4), (Tenant("b"), 2), ["-", "b", "-", "b", "-", "-"]),
])
def test_fair_admission_order(flood, trickle, expected):
    scheduler = Scheduler(max_batch=1, max_waiting=64)
    (a, n_a), (b, n_b) = flood, trickle
    for r in tenant_requests(a, n_a) + tenant_requests(b, n_b):
        scheduler.add(r)
    assert admission_order(scheduler, steps=80, out_tokens=4) == expected


@pytest.mark.parametrize("admission, expected", [
    # A's flood of 6 queued before B's 2: fifo admits in arrival order, fair lets B in at once
    ("fifo", ["a", "a", "a", "a", "a", "a", "b", "b"]),
    ("fair", ["a", "b", "a", "b", "a", "a", "a", "a"]),
])
def test_admission_choice(admission, expected):
    scheduler = Scheduler(max_batch=1, max_waiting=64, admission=admission)
    for r in tenant_requests(Tenant("a"), 6) + tenant_requests(Tenant("b"), 2):
        scheduler.add(r)
    assert admission_order(scheduler, steps=60, out_tokens=4) == expected


def test_fifo_keeps_each_tenants_queue_bound_and_a_preempted_request_goes_first():
    scheduler = Scheduler(max_batch=2, max_waiting=10, admission="fifo")
    capped = Tenant("a", max_waiting=2)
    a1, a2, a3 = tenant_requests(capped, 3)
    scheduler.add(a1)
    scheduler.add(a2)
    with pytest.raises(QueueFull, match="this tenant's queue holds 2"):
        scheduler.add(a3)
    b1 = tenant_requests(Tenant("b"), 1)[0]
    scheduler.add(b1)
    assert list(scheduler.waiting) == [a1, a2, b1]
    scheduler.schedule()
    assert scheduler.running == [a1, a2] and list(scheduler.waiting) == [b1]
    scheduler.add(a3)  # a1 and a2 left A's queue: room again
    scheduler._preempt(a2)
    assert list(scheduler.waiting) == [a2, b1, a3]


def test_an_unknown_admission_is_refused():
    with pytest.raises(ValueError, match="unknown admission 'lifo'; choose one of fair, fifo"):
        Scheduler(max_batch=1, max_waiting=1, admission="lifo")


def test_one_tenant_is_plain_arrival_order():
    scheduler = Scheduler(max_batch=2, max_waiting=16)
    reqs = tenant_requests(Tenant("a"), 5)
    for r in reqs:
        scheduler.add(r)
    admitted = []
    for _ in range(20):
        scheduler.schedule()
        for r in list(scheduler.running):
            if r not in admitted:
                admitted.append(r)
            if not r.prefilling:
                scheduler.remove(r)
    assert admitted == reqs


def test_a_tenants_own_queue_bound():
    scheduler = Scheduler(max_batch=1, max_waiting=10)
    capped = Tenant("a", max_waiting=2)
    first, second, third = tenant_requests(capped, 3)
    scheduler.add(first)
    scheduler.add(second)
    with pytest.raises(QueueFull, match="this tenant's queue holds 2"):
        scheduler.add(third)
    scheduler.add(tenant_requests(Tenant("b"), 1)[0])  # other tenants are still admitted
    assert len(scheduler.waiting) == 3
