"""Per-request composition of adapters (hybrid PEFT): what may be combined, checked on the store's records.

A request may name several stored adapters at once (API: ``"adapters": ["a", "b"]`` or
``{"a": 0.7, "b": 0.3}``, ``"adapter_combination": "cat" | "linear"``). The members fall in three
families, at most one adapter of each of the last two:

* **weight deltas** (``lora``, ``dora``): any number of LoRAs, each with a weight, combined into one
  LoRA exactly as PEFT's ``LoraModel.add_weighted_adapter(adapters, weights, combination_type)``
  (peft 0.21, ``tuners/lora/model.py``):

  - ``cat``: ``A = cat_i(w_i s_i A_i)``, ``B = cat_i(B_i)``: the delta is ``sum_i w_i s_i B_i A_i``
    exactly; rank = the sum of the members' ranks (``r``, or the largest ``rank_pattern`` value).
  - ``linear``: ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i``, ``B = sum_i sqrt|w_i s_i| B_i`` (cross
    terms included: PEFT calls it "a very rough approximation"); every member must have the same rank.
  - the combined adapter's scaling is PEFT's for ``r = lora_alpha = new rank`` under the *first*
    member's config: 1, or ``sqrt(new rank)`` when that member sets ``use_rslora``.
  - one member alone is PEFT's one-adapter case (linear: ``w s B A``).

  DoRA and LoRA bias terms (``lora_bias``, ``bias`` all/lora_only) are not combined by PEFT (the
  magnitude vector and biases of the new adapter are left untrained), so such a member may only stand
  alone in its family, at weight 1.
* **activation scaling** (``ia3``), at weight 1;
* **virtual tokens** (``prefix``, ``prompt``: prefix tuning, prompt tuning, P-tuning), at weight 1;
* **bottleneck** (AdapterHub houlsby / pfeiffer / parallel), at weight 1: a residual module after the
  attention block and/or the MLP, computed over the (LoRA / IA3-)adapted sublayers.

Order (what PEFT computes when the adapters are applied one over another): the weight delta is
innermost, IA3 scales the adapted layer, the virtual tokens run through that model. That is PEFT's
``merge_and_unload()`` of the LoRA, an IA3 ``PeftModel`` loaded on the result (merged in turn), and the
prefix / prompt adapter loaded last; `tests/test_composition_golden.py` holds the engine to exactly that.

This module is torch-free: the API and the engine's submission path call :func:`plan_composition` with
the store's records and configs; the tensors are combined by :mod:`adapters.kinds.composite`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from adapters.peft_files import AdapterError

COMBINATIONS = ("cat", "linear")
DEFAULT_COMBINATION = "cat"  # exact (no cross terms); PEFT's own default, "svd", is not offered
MAX_MEMBERS = 8
MAX_WEIGHT = 10.0  # |weight| bound (a weight is a multiplier of the member's delta)
FAMILY_OF_KIND = {"lora": "lora", "dora": "lora", "ia3": "ia3", "prefix": "virtual", "prompt": "virtual",
                  "bottleneck": "bottleneck"}


@dataclass(frozen=True)
class Member:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class Composition:
    """Several adapters applied to one request; members in the request's order (PEFT's order for LoRAs)."""

    members: tuple[Member, ...]
    combination: str = DEFAULT_COMBINATION

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def describe(self) -> str:
        """A readable, canonical label (metrics, logs): ``a*0.7+b*0.3[cat]``."""
        return "+".join(f"{m.name}*{m.weight:g}" for m in self.members) + f"[{self.combination}]"


def parse_members(adapters: list[str] | dict[str, float]) -> tuple[Member, ...]:
    """The API's two shapes: a list of names (weight 1 each) or a mapping name -> weight."""
    items = [(name, 1.0) for name in adapters] if isinstance(adapters, list) else list(adapters.items())
    if not items:
        raise AdapterError("adapters names no adapter")
    if len(items) > MAX_MEMBERS:
        raise AdapterError(f"adapters names {len(items)} adapters; at most {MAX_MEMBERS} may be composed")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapters names {sorted(n for n in set(names) if names.count(n) > 1)[0]!r} twice")
    for name, weight in items:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) \
                or weight == 0 or abs(weight) > MAX_WEIGHT:
            raise AdapterError(f"the weight of adapter {name!r} must be a nonzero number in "
                               f"[-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {weight!r}")
    return tuple(Member(n, float(w)) for n, w in items)


def plan_composition(composition: Composition, records: dict, configs: dict, *, max_rank: int) -> int:
    """Check a composition against the members' store records (``kind``, ``rank``) and PEFT configs;
    returns the combined LoRA rank (0 without LoRA members). Raises AdapterError naming what to change."""
    if composition.combination not in COMBINATIONS:
        raise AdapterError(f"adapter_combination must be one of {', '.join(COMBINATIONS)}, "
                           f"got {composition.combination!r}")
    by_family: dict[str, list[Member]] = {}
    for member in composition.members:
        kind = records[member.name].kind
        family = FAMILY_OF_KIND.get(kind)
        if family is None:
            raise AdapterError(f"adapter {member.name!r} is of kind {kind!r}, which cannot be composed")
        by_family.setdefault(family, []).append(member)
    for family, label in (("ia3", "IA3"), ("virtual", "prefix, prompt-tuning or P-tuning"),
                          ("bottleneck", "bottleneck (AdapterHub)")):
        members = by_family.get(family, [])
        if len(members) > 1:
            raise AdapterError(f"adapters {members[0].name!r} and {members[1].name!r} are both {label} adapters; "
                               "a composition holds at most one of that family (LoRAs may be several)")
        if members and members[0].weight != 1.0:
            raise AdapterError(f"adapter {members[0].name!r} is a {records[members[0].name].kind} adapter: weights "
                               "apply to LoRA adapters only (give it weight 1)")
    loras = by_family.get("lora", [])
    if not loras:
        return 0
    if len(loras) == 1 and loras[0].weight == 1.0:
        return records[loras[0].name].rank  # served as it is
    for m in loras:
        config = configs[m.name]
        if records[m.name].kind == "dora":
            raise AdapterError(f"adapter {m.name!r} is a DoRA adapter: PEFT's add_weighted_adapter does not combine "
                               "DoRA magnitudes, so it can only be composed alone among LoRAs, at weight 1")
        if config.get("lora_bias") or (config.get("bias") or "none") != "none":
            raise AdapterError(f"adapter {m.name!r} trains bias terms (lora_bias / bias): PEFT's add_weighted_adapter "
                               "does not combine them, so it can only be composed alone among LoRAs, at weight 1")
    ranks = [_config_rank(configs[m.name]) for m in loras]
    if composition.combination == "linear" and len(set(ranks)) > 1:
        raise AdapterError(f"adapter_combination 'linear' needs LoRAs of one rank, got ranks {ranks}; "
                           "use 'cat' (exact, rank = the sum)")
    rank = sum(ranks) if composition.combination == "cat" and len(loras) > 1 else max(ranks)
    if rank > max_rank:
        raise AdapterError(f"the combined LoRA has rank {rank} (cat sums the members' ranks {ranks}), above this "
                           f"server's --max-lora-rank {max_rank}; compose fewer LoRAs or raise --max-lora-rank")
    return rank


def version_key(record) -> str:
    """The slot/cache key of one stored adapter version (an ``AdapterRecord``): ``name@sha256-prefix``."""
    return f"{record.name}@{record.sha256[:16]}"


def composition_key(composition: Composition, records: dict) -> str:
    """``a@sha*0.7+b@sha*0.3|cat``: the members' versions and weights (adapter names hold none of ``@*+|``)."""
    members = "+".join(f"{version_key(records[m.name])}*{m.weight!r}" for m in composition.members)
    return f"{members}|{composition.combination}"


def member_versions(key: str) -> list[str]:
    """The member version keys of a composition key, in order (a single version key: itself)."""
    return [part.rsplit("*", 1)[0] for part in key.split("|")[0].split("+")]


def names_of(key: str) -> frozenset[str]:
    """The stored adapter names a version or composition key holds."""
    return frozenset(v.split("@")[0] for v in member_versions(key))


def resolve(store, composition: Composition, *, max_rank: int) -> tuple[str, int]:
    """(key, virtual tokens) of a composition over ``store`` (an AdapterStore), checked with
    :func:`plan_composition` on the members' records and PEFT configs; raises AdapterNotFound, AdapterError."""
    from adapters.peft_files import read_config

    records = {m.name: store.get(m.name) for m in composition.members}
    configs = {name: read_config(store.path(name)) for name in records}
    plan_composition(composition, records, configs, max_rank=max_rank)
    return composition_key(composition, records), sum(r.num_virtual_tokens for r in records.values())


def _config_rank(config: dict) -> int:
    """PEFT's rank of a member in add_weighted_adapter: r, or the largest rank_pattern value if larger."""
    return int(max([config["r"], *(config.get("rank_pattern") or {}).values()]))
