"""One class per adapter kind (see :mod:`adapters.kinds.base` for the interface they share)."""
from __future__ import annotations

from adapters.kinds.base import Adapter
from adapters.kinds.bottleneck import BottleneckAdapter
from adapters.kinds.dora import DoraAdapter
from adapters.kinds.ia3 import Ia3Adapter
from adapters.kinds.lora import LoraAdapter, LoraWeights
from adapters.kinds.mam import MamAdapter
from adapters.kinds.prefix import PrefixAdapter
from adapters.kinds.prompt import PromptAdapter
from adapters.kinds.unipelt import UnipeltAdapter

KINDS: tuple[type[Adapter], ...] = (LoraAdapter, DoraAdapter, Ia3Adapter, PrefixAdapter, PromptAdapter,
                                    BottleneckAdapter, MamAdapter, UnipeltAdapter)
KIND_BY_NAME: dict[str, type[Adapter]] = {k.kind: k for k in KINDS}

__all__ = ["Adapter", "BottleneckAdapter", "DoraAdapter", "Ia3Adapter", "KINDS", "KIND_BY_NAME", "LoraAdapter", "LoraWeights",
           "MamAdapter", "PrefixAdapter", "PromptAdapter", "UnipeltAdapter"]
