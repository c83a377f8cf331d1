"""Table tests for the device slot table and the merge policy (pure Python)."""
import pytest

from server.engine.merge_policy import MergePolicy
from server.engine.slots import SlotTable


def test_slots_fill_then_evict_least_recently_used_unreferenced():
    table = SlotTable(2)
    a = table.acquire("a")
    b = table.acquire("b")
    assert (a.slot, a.needs_load, b.slot, b.needs_load) == (1, True, 2, True)
    assert table.acquire("c") is None and not table.can_acquire("c")  # both referenced
    table.release(a.slot)
    table.release(b.slot)          # b is now the most recently used
    c = table.acquire("c")
    assert (c.slot, c.needs_load, c.evicted) == (1, True, "a")
    assert table.lookup("a") is None and table.lookup("b") == 2


@pytest.mark.parametrize("steps, expected", [
    # (operations, resident keys at the end)
    ([("acq", "a"), ("rel", "a"), ("acq", "a")], {"a"}),                       # hit, no reload
    ([("acq", "a"), ("rel", "a"), ("acq", "b"), ("rel", "b"), ("acq", "c")], {"b", "c"}),
    ([("acq", "a"), ("rel", "a"), ("pin", "a"), ("acq", "b"), ("rel", "b"), ("acq", "c")], {"a", "c"}),
    ([("acq", "a"), ("retire", "a"), ("acq", "b")], {"b"}),                   # retired but referenced: slot kept
])
def test_slot_table_sequences(steps, expected):
    table = SlotTable(2)
    for op, key in steps:
        if op == "acq":
            assert table.acquire(key) is not None
        elif op == "rel":
            table.release(table.lookup(key))
        elif op == "pin":
            assert table.pin(key)
        elif op == "retire":
            table.retire(key)
    assert {k for k in "abc" if table.lookup(k) is not None} == expected


def test_retired_slot_frees_when_last_reference_leaves():
    table = SlotTable(1)
    old = table.acquire("a@v1")
    table.retire("a@v1")
    assert table.lookup("a@v1") is None and table.acquire("a@v2") is None  # still referenced
    table.release(old.slot)
    assert table.in_use == 0
    assert table.acquire("a@v2").needs_load


def test_release_without_acquire_is_an_error():
    table = SlotTable(1)
    slot = table.acquire("a").slot
    table.release(slot)
    with pytest.raises(RuntimeError):
        table.release(slot)


def run_policy(policy, steps):
    return [(d.action, d.key) if d else None for d in (policy.observe(rows) for rows in steps)]


@pytest.mark.parametrize("steps, events", [
    # hot for 3 steps at share 1.0 -> merge on the 3rd
    ([["a"] * 4] * 3, [None, None, ("merge", "a")]),
    # hot but the batch is below min_batch -> nothing
    ([["a"] * 3] * 5, [None] * 5),
    # share 0.75 < 0.9 -> nothing
    ([["a", "a", "a", None]] * 5, [None] * 5),
    # streak broken by a cold step -> starts over
    ([["a"] * 4, ["a"] * 4, ["a", "b", "c", "d"], ["a"] * 4, ["a"] * 4, ["a"] * 4],
     [None, None, None, None, None, ("merge", "a")]),
])
def test_merge_policy_merges_only_sustained_dominance(steps, events):
    assert run_policy(MergePolicy(0.9, 0.5, patience=3, min_batch=4), steps) == events


def test_merge_policy_hysteresis_and_unmerge():
    policy = MergePolicy(0.9, 0.5, patience=2, min_batch=4)
    hot, warm, cold = ["a"] * 4, ["a", "a", "a", None], ["a", None, None, None]
    events = run_policy(policy, [hot, hot, warm, warm, warm, cold, warm, cold, cold])
    # merged at step 2; 0.75 share sits between the thresholds: stays merged; needs 2 cold steps in a row
    assert events == [None, ("merge", "a"), None, None, None, None, None, None, ("unmerge", "a")]
    assert policy.merged is None


def test_merge_policy_forget():
    policy = MergePolicy(0.9, 0.5, patience=1, min_batch=1)
    assert policy.observe(["a"]).action == "merge"
    assert policy.forget("b") is None
    assert policy.forget("a").action == "unmerge" and policy.merged is None


def test_merge_policy_rejects_inverted_thresholds():
    with pytest.raises(ValueError):
        MergePolicy(0.5, 0.9, patience=1, min_batch=1)
