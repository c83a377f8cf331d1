"""A composition of loaded adapters served from one slot (semantics: :mod:`adapters.composition`).

:func:`compose` takes the members (loaded :class:`Adapter` instances, weights, combination) that
:func:`adapters.composition.plan_composition` accepted and returns a :class:`CompositeAdapter`, which
writes into one slot what the members would each write (their families use disjoint per-layer state:
LoRA/DoRA factors, IA3 scales, bias terms; prefix K/V or a soft prompt), with several LoRAs first
combined into one as PEFT's ``add_weighted_adapter`` does. `AdapterLinear` applies a slot's IA3 scales
around the whole adapted layer (``y = ((W + sBA)(x * l_in) + b) * l_out``), which is IA3 loaded over the
merged LoRA, so a composite needs no formula of its own. A composite's soft prompt runs through the
composite's own slot (LoRA and IA3 active), as PEFT's prompt tuning does over the merged model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from adapters.composition import FAMILY_OF_KIND, Composition
from adapters.kinds.base import Adapter
from adapters.kinds.lora import LoraAdapter, LoraWeights


@dataclass
class CompositeAdapter(Adapter):
    """Members in family order (weight delta, IA3, virtual tokens); a weighted LoRA sum is one combined
    :class:`LoraAdapter` here."""

    members: tuple[Adapter, ...] = ()
    member_names: frozenset[str] = field(default_factory=frozenset)

    kind = "composite"  # class attribute, not a field (Adapter.kind is a ClassVar)

    @property
    def layer_state(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(m.layer_state for m in self.members))

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return all(m.mergeable for m in self.members) and not self.num_virtual_tokens

    def write(self, layers: dict, slot: int) -> None:
        for member in self.members:
            member.write(layers, slot)

    def prefix_kv(self) -> torch.Tensor | None:
        return next((kv for kv in (m.prefix_kv() for m in self.members) if kv is not None), None)

    def soft_prompt(self) -> torch.Tensor | None:
        return next((e for e in (m.soft_prompt() for m in self.members) if e is not None), None)


def compose(composition: Composition, loaded: dict[str, Adapter]) -> CompositeAdapter:
    """``loaded``: member name -> its adapter, for every member of ``composition``."""
    loras = [(loaded[m.name], m.weight) for m in composition.members if FAMILY_OF_KIND[loaded[m.name].kind] == "lora"]
    rest = [loaded[m.name] for m in composition.members if FAMILY_OF_KIND[loaded[m.name].kind] != "lora"]
    rest.sort(key=lambda a: FAMILY_OF_KIND[a.kind] == "virtual")  # IA3 before virtual tokens (no dependence)
    if len(loras) == 1 and loras[0][1] == 1.0:
        delta = [loras[0][0]]
    elif loras:
        delta = [weighted_lora(loras, composition.combination, name=composition.describe())]
    else:
        delta = []
    members = tuple(delta + rest)
    return CompositeAdapter(name=composition.describe(), config={}, members=members,
                            member_names=frozenset(composition.names),
                            rank=max((m.rank for m in members), default=0),
                            target_modules=tuple(sorted({t for m in members for t in m.target_modules})),
                            nbytes=sum(m.nbytes for m in members),
                            num_virtual_tokens=sum(m.num_virtual_tokens for m in members))


def weighted_lora(loras: list[tuple[LoraAdapter, float]], combination: str, name: str) -> LoraAdapter:
    """PEFT's ``add_weighted_adapter`` (cat or linear; one member: linear) of plain LoRAs, per module.

    cat:    A = cat_i(w_i s_i A_i) [sum r_i, I],  B = cat_i(B_i) [O, sum r_i]
    linear: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,  B = sum_i sqrt|w_i s_i| B_i
    The result's scaling is PEFT's for r = lora_alpha = the new rank under the first member's config.
    """
    first = loras[0][0].config
    ranks = [max([a.config["r"], *(a.config.get("rank_pattern") or {}).values()]) for a, _ in loras]
    combination = "linear" if len(loras) == 1 else combination
    new_rank = sum(ranks) if combination == "cat" else ranks[0]
    scaling = math.sqrt(new_rank) if first.get("use_rslora") else 1.0  # alpha / sqrt(r) or alpha / r, alpha = r
    out: dict[tuple[int, str], LoraWeights] = {}
    for key in sorted({k for a, _ in loras for k in a.lora}):
        present = [(a.lora[key], w) for a, w in loras if key in a.lora]
        if combination == "cat":
            a = torch.cat([lw.a.float() * (w * lw.scaling) for lw, w in present], dim=0)
            b = torch.cat([lw.b.float() for lw, _ in present], dim=1)
        else:
            a = sum(math.copysign(math.sqrt(abs(w * lw.scaling)), w * lw.scaling) * lw.a.float() for lw, w in present)
            b = sum(math.sqrt(abs(w * lw.scaling)) * lw.b.float() for lw, w in present)
        dtype = present[0][0].a.dtype
        out[key] = LoraWeights(a=a.to(dtype), b=b.to(dtype), scaling=scaling)
    return LoraAdapter(name=name, config={**first, "r": new_rank, "lora_alpha": new_rank}, lora=out,
                       rank=max(w.rank for w in out.values()),
                       target_modules=tuple(sorted({m for _, m in out})),
                       nbytes=sum(w.a.nbytes + w.b.nbytes for w in out.values()))
