"""IA3 (PEFT ``peft_type: IA3``): learned per-feature scales on each targeted linear.

A module is feed-forward when ``feedforward_modules`` (list) has an entry the module name ends with
(plain ``str.endswith``, as PEFT), or (string) the regex full-matches it. Feed-forward modules
scale their *input*: ``y = W (x * l) + b``, ``l`` ``[in]`` (stored ``[1, in]``); the others scale
their *output*: ``y = (W x + b) * l``, ``l`` ``[out]`` (stored ``[out, 1]``). Both fold into the
weight exactly (AdapterLinear.folded), so IA3 is mergeable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from adapters.kinds.base import Adapter
from adapters.kinds.lora import check_targets_field
from adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_tensor
from adapters.peft_targets import KEY_RE, BaseSpec, parse_key, resolve_targets


def _is_feedforward(config: dict, key: str) -> bool:
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)


@dataclass
class Ia3Adapter(Adapter):
    """``ia3``: ``(layer, module) -> l`` (1-D: ``[in]`` for modules in ``ia3_feedforward``, else ``[out]``)."""

    ia3: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    ia3_feedforward: frozenset[str] = frozenset()

    kind: ClassVar[str] = "ia3"
    config_fields: ClassVar[frozenset[str]] = frozenset({
        "target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights", "fan_in_fan_out",
        "layers_to_transform", "layers_pattern"})
    layer_state: ClassVar[frozenset[str]] = frozenset({"ia3"})
    mergeable: ClassVar[bool] = True

    @classmethod
    def matches(cls, config: dict) -> bool:
        return str(config.get("peft_type", "")).upper() == "IA3"

    @classmethod
    def check_config(cls, config: dict) -> None:
        check_targets_field(config)
        ff = config.get("feedforward_modules") or []
        targets = config["target_modules"]
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise AdapterError(f"{CONFIG_NAME}: feedforward_modules {sorted(set(ff) - set(targets))} are not in "
                               "target_modules; feedforward_modules must be a subset of target_modules")

    @classmethod
    def inspect(cls, config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[str]]:
        modules = set()
        for key in shapes:
            m = KEY_RE.match(key)
            if not m:
                raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}: not a per-layer adapter weight")
            modules.add(m["module"])
        return 0, sorted(modules)

    @classmethod
    def load(cls, name: str, config: dict, base: BaseSpec, shapes: dict, handle: Any, *, max_rank: int,
             dtype: torch.dtype) -> "Ia3Adapter":
        targets = resolve_targets(config, base)
        keys: dict[tuple[int, str], str] = {}
        for key in shapes:
            layer, module, _ = parse_key(key, ("ia3_l",), base)
            if (layer, module) not in targets:
                raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is for a module that target_modules in "
                                   f"{CONFIG_NAME} does not select; the config and weights disagree")
            if (layer, module) in keys:
                raise AdapterError(f"{WEIGHTS_NAME} holds two ia3_l tensors for layers.{layer}.{module}; "
                                   "save one adapter per directory")
            keys[(layer, module)] = key
        out: dict[tuple[int, str], torch.Tensor] = {}
        ff_by_module: dict[str, bool] = {}
        for layer, module in sorted(targets):
            full = base.module_name(layer, module)
            if (layer, module) not in keys:
                raise AdapterError(f"{WEIGHTS_NAME} lacks ia3_l for {full}, which target_modules selects")
            is_ff = _is_feedforward(config, full)
            if ff_by_module.setdefault(module, is_ff) != is_ff:
                raise AdapterError(f"feedforward_modules in {CONFIG_NAME} makes {module} feed-forward in some "
                                   "layers and not in others, which is not served")
            fan_in, fan_out = base.module_shapes[module]
            want = (1, fan_in) if is_ff else (fan_out, 1)
            key = keys[(layer, module)]
            if shapes[key] != want:
                raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} has shape {list(shapes[key])}, expected "
                                   f"{list(want)} ({'feed-forward: scales the input' if is_ff else 'scales the output'}"
                                   f", per feedforward_modules in {CONFIG_NAME}); the adapter does not fit this base")
            out[(layer, module)] = load_tensor(handle, key, dtype).flatten()
        if all(bool((v == 1).all()) for v in out.values()):
            raise AdapterError(f"every ia3_l vector in {WEIGHTS_NAME} is all ones: this adapter is untrained and "
                               "would change nothing; upload the trained adapter")
        return cls(name=name, config=config, ia3=out, ia3_feedforward=frozenset(m for m, f in ff_by_module.items() if f),
                   target_modules=tuple(sorted({m for _, m in out})), nbytes=sum(v.nbytes for v in out.values()))

    def write(self, layers: dict, slot: int) -> None:
        for (i, module), vector in self.ia3.items():
            layers[(i, module)].set_ia3(slot, vector, feedforward=module in self.ia3_feedforward)
