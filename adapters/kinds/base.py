"""The interface every adapter kind implements.

One subclass of :class:`Adapter` per kind (:mod:`adapters.kinds` lists them); one instance is one
validated adapter, its tensors on CPU in the requested dtype. What the engine asks of a kind:

* ``matches(config)`` (class): whether a PEFT ``adapter_config.json`` is of this kind;
  ``check_config(config)`` (class): the base-independent checks of that config;
  ``config_fields``: the config fields the kind reads (any other set field is refused, unless it is
  metadata; see :mod:`adapters.format`).
* ``inspect(config, shapes)`` (class): ``(rank, target module short names)`` from the safetensors
  header alone (the store's index).
* ``load(name, config, base, shapes, handle, max_rank=, dtype=)`` (class): read the tensors, check
  them against the base (:class:`adapters.peft_targets.BaseSpec`) and return an instance.
* ``write(layers, slot)``: put the kind's per-layer state into a *cleared* slot of every
  ``AdapterLinear`` it targets, through the layer's own ``set_*`` methods (the layer owns its slot
  tensors; clearing is ``AdapterLinear.clear``).
* ``layer_state``: which per-layer state ``write`` fills (``"lora"``, ``"ia3"``, ``"dora"``), so a
  forward skips the work of the others when no row of the batch needs it.
* ``mergeable``: whether ``AdapterLinear.folded`` folds the slot into a base weight exactly (then
  merge-on-demand may serve its rows with no adapter compute).
* ``prefix_kv()``: per-layer K/V ``[layers, 2, Hkv, P, D]`` written into the row's KV cache before
  the prompt, or None; ``soft_prompt()``: input embeddings ``[P, hidden]`` run before the prompt,
  or None. ``num_virtual_tokens`` is P (cache positions before the prompt; 0 for weight kinds);
  ``virtual_tokens(config)`` (class) gives it from the config alone (the store's index).
* ``prefix_shifts_positions``: whether the prompt's rope positions start at P (PEFT's prefix and prompt
  tuning) or at 0 (AdapterHub's prefix tuning, inside MAM: :mod:`adapters.kinds.mam`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from adapters.peft_targets import BaseSpec


@dataclass
class Adapter:
    """A validated adapter of some kind (subclasses add the kind's tensors)."""

    name: str
    config: dict
    rank: int = 0
    target_modules: tuple[str, ...] = ()
    nbytes: int = 0
    num_virtual_tokens: int = 0

    kind: ClassVar[str] = ""
    config_fields: ClassVar[frozenset[str]] = frozenset()
    layer_state: ClassVar[frozenset[str]] = frozenset()
    mergeable: ClassVar[bool] = False
    prefix_shifts_positions: ClassVar[bool] = True

    @classmethod
    def matches(cls, config: dict) -> bool:
        raise NotImplementedError

    @classmethod
    def check_config(cls, config: dict) -> None:
        """Base-independent checks; raise AdapterError naming the field."""

    @classmethod
    def virtual_tokens(cls, config: dict) -> int:
        """P from the config alone: PEFT's ``num_virtual_tokens`` for kinds without per-layer state."""
        return int(config.get("num_virtual_tokens") or 0) if not cls.layer_state else 0

    @classmethod
    def inspect(cls, config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[str]]:
        """(largest rank, sorted short names of the modules that carry weights) from the header."""
        return 0, []

    @classmethod
    def load(cls, name: str, config: dict, base: BaseSpec, shapes: dict[str, tuple[int, ...]], handle: Any, *,
             max_rank: int, dtype: torch.dtype) -> "Adapter":
        raise NotImplementedError

    def write(self, layers: dict, slot: int) -> None:
        """Fill a cleared slot of ``layers`` ({(layer, module): AdapterLinear}); kinds without layer state do
        nothing."""

    def prefix_kv(self) -> torch.Tensor | None:
        return None

    def soft_prompt(self) -> torch.Tensor | None:
        return None
