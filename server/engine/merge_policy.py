"""When to merge a hot adapter into the base, and when to unmerge it (pure Python).

Merging removes an adapter's per-row compute for its own rows but adds a
correction for every other row, so it pays only when one adapter dominates the
running batch (dLoRA). The policy watches each step's share of running rows per
adapter: an adapter whose share stays >= `merge_threshold` for `patience`
consecutive steps (with at least `min_batch` rows running) is merged; the merged
adapter is unmerged once its share stays < `unmerge_threshold` for `patience`
steps. The gap between the thresholds is the hysteresis that stops flapping.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class MergeDecision:
    action: str          # "merge" | "unmerge"
    key: str             # adapter version


class MergePolicy:
    def __init__(self, merge_threshold: float, unmerge_threshold: float, patience: int, min_batch: int):
        if not 0.0 < unmerge_threshold <= merge_threshold <= 1.0:
            raise ValueError("need 0 < unmerge_threshold <= merge_threshold <= 1")
        self.merge_threshold = merge_threshold
        self.unmerge_threshold = unmerge_threshold
        self.patience = max(1, patience)
        self.min_batch = min_batch
        self.merged: str | None = None
        self._candidate: str | None = None
        self._streak = 0

    def observe(self, row_adapters: list[str | None]) -> MergeDecision | None:
        """Feed one step's adapter per running row (None = base, or an unmergeable kind)."""
        total = len(row_adapters)
        if total == 0:  # an idle engine keeps its state: the next burst likely has the same hot adapter
            return None
        counts = Counter(a for a in row_adapters if a is not None)
        if self.merged is not None:
            share = counts.get(self.merged, 0) / total
            self._streak = self._streak + 1 if share < self.unmerge_threshold else 0
            if self._streak >= self.patience:
                key, self.merged, self._streak = self.merged, None, 0
                return MergeDecision("unmerge", key)
            return None
        top, count = counts.most_common(1)[0] if counts else (None, 0)
        hot = top is not None and total >= self.min_batch and count / total >= self.merge_threshold
        if not hot:
            self._candidate, self._streak = None, 0
            return None
        self._streak = self._streak + 1 if top == self._candidate else 1
        self._candidate = top
        if self._streak >= self.patience:
            self.merged, self._candidate, self._streak = top, None, 0
            return MergeDecision("merge", top)
        return None

    def forget(self, key: str) -> MergeDecision | None:
        """The adapter is going away: unmerge it now if merged."""
        if self.merged == key:
            self.merged, self._streak = None, 0
            return MergeDecision("unmerge", key)
        return None
