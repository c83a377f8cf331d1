"""DoRA (PEFT ``peft_type: LORA`` with ``use_dora: true``): weight-decomposed LoRA.

PEFT 0.21 (``peft/tuners/lora/dora.py`` ``DoraLinearLayer.forward``, ``variants.py``
``DoraLinearVariant``) computes, per targeted linear with base weight ``W`` ``[out, in]`` and bias
``b``::

    norm = ||W + scaling * B A||  per output row (torch.linalg.norm(dim=1)), detached    [out]
    g    = m / norm                                      (m: lora_magnitude_vector [out])
    y    = W x + b + (g - 1) * (W x) + g * scaling * B A x  =  g * (W x + scaling * B A x) + b

``W`` is the dequantized weight under a bitsandbytes base. ``g`` depends only on the adapter and
the base, so it is computed once when the slot is written (AdapterLinear.set_dora) and a row costs
one LoRA plus one output scale; the bias is not scaled. Merging is exact:
``W' = g[:, None] * (W + scaling * B A)``, ``b' = b`` (PEFT's ``merge_safe``), so DoRA is mergeable.

Tensors: ``...{module}.lora_magnitude_vector`` (PEFT saves it without ``.weight``) ``[out]``, plus
LoRA's ``lora_A`` / ``lora_B``. A DoRA adapter with all-zero ``B`` still changes the output when
``m`` was trained, so the untrained-LoRA refusal does not apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from adapters.kinds.lora import LoraAdapter
from adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_tensor
from adapters.peft_targets import BaseSpec


@dataclass
class DoraAdapter(LoraAdapter):
    """LoRA factors plus ``magnitude``: ``(layer, module) -> m`` ``[out_features]``."""

    magnitude: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    kind: ClassVar[str] = "dora"
    config_fields: ClassVar[frozenset[str]] = LoraAdapter.config_fields | {"use_dora"}
    layer_state: ClassVar[frozenset[str]] = frozenset({"lora", "dora"})
    mergeable: ClassVar[bool] = True
    tensor_params: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude_vector")
    missing_hint: ClassVar[str] = " (use_dora is true)"
    zero_b_is_untrained: ClassVar[bool] = False  # a trained magnitude alone changes the output

    @classmethod
    def matches(cls, config: dict) -> bool:
        return str(config.get("peft_type", "")).upper() == "LORA" and config.get("use_dora") is True

    @classmethod
    def check_config(cls, config: dict) -> None:
        if config.get("lora_bias"):  # PEFT's LoraConfig refuses the pair too
            raise AdapterError(f"{CONFIG_NAME} sets lora_bias=true with use_dora=true: PEFT does not support lora_bias "
                               "for DoRA; retrain with one of them")
        super().check_config(config)

    @classmethod
    def inspect(cls, config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[str]]:
        rank, modules = super().inspect(config, shapes)
        factors = {k.split(".lora_A")[0] for k in shapes if ".lora_A" in k}
        magnitudes = {k.split(".lora_magnitude_vector")[0] for k in shapes if ".lora_magnitude_vector" in k}
        if factors != magnitudes:
            missing = sorted(factors ^ magnitudes)[0]
            raise AdapterError(f"{CONFIG_NAME} sets use_dora=true but {WEIGHTS_NAME} does not hold both lora_A and "
                               f"lora_magnitude_vector for {missing}; save the DoRA adapter with PEFT")
        return rank, modules

    def _load_extra(self, base: BaseSpec, shapes: dict, handle: Any, keys: dict, targets: set, dtype) -> None:
        for layer, module in sorted(targets):
            key = keys[(layer, module, "lora_magnitude_vector")]
            want = (base.module_shapes[module][1],)
            if shapes[key] != want:
                raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} has shape {list(shapes[key])}, expected "
                                   f"{list(want)} (one magnitude per output feature); the adapter does not fit "
                                   "this base")
            self.magnitude[(layer, module)] = load_tensor(handle, key, dtype)
        self.nbytes += sum(v.nbytes for v in self.magnitude.values())

    def _write_extra(self, layers: dict, slot: int) -> None:
        for key, m in self.magnitude.items():
            layers[key].set_dora(slot, m)
