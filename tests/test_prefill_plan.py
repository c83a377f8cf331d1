"""plan_prefill: how requests admitted in one step are grouped into batched prefill forwards."""
import pytest

from server.engine.scheduler import plan_prefill


@pytest.mark.parametrize("lengths, starts, budget, max_seq_len, expected", [
    ([], [], 64, 100, []),
    ([5], [0], 64, 100, [(0, 1)]),
    ([4, 4, 4, 4], [0, 0, 0, 0], 16, 100, [(0, 4)]),            # exactly the budget
    ([4, 4, 4, 4, 4], [0, 0, 0, 0, 0], 16, 100, [(0, 4), (4, 5)]),
    ([2, 10, 2], [0, 0, 0], 20, 100, [(0, 2), (2, 3)]),           # padding to 10 counts: 3 x 10 > 20
    ([50, 3], [0, 0], 16, 100, [(0, 1), (1, 2)]),                 # a prompt over the budget runs alone
    ([3, 50], [0, 0], 16, 100, [(0, 1), (1, 2)]),
    ([3, 90], [8, 0], 1000, 96, [(0, 1), (1, 2)]),                # 8 + 90 would pass the end of the cache
    ([3, 80], [8, 0], 1000, 96, [(0, 2)]),
])
def test_plan_prefill(lengths, starts, budget, max_seq_len, expected):
    groups = plan_prefill(lengths, starts, budget, max_seq_len)
    assert [(g.start, g.stop) for g in groups] == expected
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) == 1 or len(group) * longest <= budget
        assert len(group) == 1 or max(starts[i] for i in group) + longest <= max_seq_len
