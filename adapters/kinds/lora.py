"""LoRA (PEFT ``peft_type: LORA``): ``y = W x + b + scaling * B (A x)`` on each targeted linear.

Per (layer, module): ``A`` ``[r, in]``, ``B`` ``[out, r]`` (``lora_A`` / ``lora_B`` tensors), and
``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``alpha`` per module
after ``rank_pattern`` / ``alpha_pattern`` (see :mod:`adapters.peft_targets`). The slot stores
``A`` and ``scaling * B`` (AdapterLinear.set_lora); merging folds ``W + scaling * B A``.

Bias terms (PEFT 0.21, ``tuners/lora/layer.py``, ``tuners_utils._mark_only_adapters_as_trainable``):

* ``lora_bias: true``: ``lora_B`` is ``nn.Linear(r, out, bias=True)`` and the forward adds
  ``lora_B(lora_A(x)) * scaling``, so the delta is ``scaling * (B A x + b_B)`` (``...lora_B.bias``
  ``[out]``; also on a linear without a base bias, which PEFT allows). PEFT refuses it with DoRA.
* ``bias: "all"`` / ``"lora_only"``: base biases are trained and saved (``...{module}.bias`` for a
  module LoRA does not wrap, ``...{module}.base_layer.bias`` for one it does; ``lora_only`` only the
  latter), and loading them *replaces* the base's bias: ``+ (b_new - b)``; under DoRA too (DoRA's
  ``g`` scales ``W x`` and the LoRA term, never the bias).

Both are served as one per-slot additive vector per linear (AdapterLinear.set_bias, after DoRA's
``g``), folded into the bias on merge. Refused: a saved bias the config does not announce, a bias of a
module outside the decoder linears (norms, embeddings, lm_head), a base bias where the base has none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from adapters.kinds.base import Adapter
from adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_tensor
from adapters.peft_targets import KEY_RE, BaseSpec, parse_base_bias_key, parse_key, pattern_value, resolve_targets

# init_lora_weights values after which the adapter only matches a *modified* base (or is a variant).
_REFUSED_LORA_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
_LORA_FIELDS = frozenset({
    "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "use_rslora",
    "layers_to_transform", "layers_pattern", "init_lora_weights", "lora_dropout", "bias", "fan_in_fan_out",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "eva_config", "lora_bias"})
_BIAS_MODES = ("none", "all", "lora_only")


def check_targets_field(config: dict) -> None:
    """``target_modules`` must be present: a list of names or a regex string."""
    if not config.get("target_modules"):
        raise AdapterError(f"{CONFIG_NAME} has no target_modules")
    if not isinstance(config["target_modules"], (str, list)):
        raise AdapterError(f"{CONFIG_NAME} field target_modules must be a list of names or a regex string")


@dataclass
class LoraWeights:
    """LoRA factors of one (layer, module): ``delta_y = scaling * (x @ a.T) @ b.T``.

    ``a``: ``[r, in_features]``, ``b``: ``[out_features, r]``; ``scaling`` is ``alpha / r``
    (or ``alpha / sqrt(r)`` with rsLoRA), per module after ``rank_pattern`` / ``alpha_pattern``.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    bias: torch.Tensor | None = None  # lora_B's bias [out] (lora_bias=true), unscaled

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class LoraAdapter(Adapter):
    """``lora``: ``(layer, module) -> LoraWeights``; ``rank`` is the largest rank."""

    lora: dict[tuple[int, str], LoraWeights] = field(default_factory=dict)
    base_bias: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # trained base biases [out], fp32

    kind: ClassVar[str] = "lora"
    config_fields: ClassVar[frozenset[str]] = _LORA_FIELDS
    layer_state: ClassVar[frozenset[str]] = frozenset({"lora"})
    mergeable: ClassVar[bool] = True
    tensor_params: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    missing_hint: ClassVar[str] = ""
    zero_b_is_untrained: ClassVar[bool] = True  # all-zero B (or A) changes nothing: refused

    @classmethod
    def matches(cls, config: dict) -> bool:
        return str(config.get("peft_type", "")).upper() == "LORA" and not config.get("use_dora")

    @classmethod
    def check_config(cls, config: dict) -> None:
        bias = config.get("bias") or "none"
        if bias not in _BIAS_MODES:
            raise AdapterError(f"{CONFIG_NAME} sets bias={bias!r}: PEFT's bias modes are 'none', 'all' and "
                               "'lora_only'")
        if config.get("lora_bias") not in (None, False, True):
            raise AdapterError(f"{CONFIG_NAME} field lora_bias must be true or false, got {config['lora_bias']!r}")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_REFUSED_LORA_INITS):
            raise AdapterError(
                f"{CONFIG_NAME} sets init_lora_weights={init!r}: such an adapter only reproduces its training "
                "with a modified base; save it with `path_initial_model_for_weight_conversion` to get a plain LoRA")
        for key in ("r", "lora_alpha"):
            value = config.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise AdapterError(f"{CONFIG_NAME} field {key} must be a positive number, got {value!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            value = config.get(key) or {}
            if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
                raise AdapterError(f"{CONFIG_NAME} field {key} must map module patterns to positive numbers")
        check_targets_field(config)

    @classmethod
    def inspect(cls, config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[str]]:
        rank, modules = 0, set()
        for key, shape in shapes.items():
            m = KEY_RE.match(key)
            if not m:
                raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}: not a per-layer adapter weight")
            modules.add(m["module"])
            if m["tail"].split(".")[0] == "lora_A" and len(shape) == 2:
                rank = max(rank, shape[0])
        return int(rank), sorted(modules)

    @classmethod
    def load(cls, name: str, config: dict, base: BaseSpec, shapes: dict, handle: Any, *, max_rank: int,
             dtype: torch.dtype) -> "LoraAdapter":
        targets = resolve_targets(config, base)
        keys = cls._tensor_keys(shapes, base, targets, config)
        weights = _lora_weights(config, base, shapes, handle, keys, targets, max_rank, dtype)
        base_bias = _base_biases(base, shapes, handle, keys)
        if (cls.zero_b_is_untrained and not base_bias and all(w.bias is None or not w.bias.any() for w in weights.values())
                and all(not w.b.any() or not w.a.any() for w in weights.values())):
            raise AdapterError(f"every lora_B (or lora_A) in {WEIGHTS_NAME} is all zeros: this adapter is untrained "
                               "and would change nothing; upload the trained adapter")
        adapter = cls(name=name, config=config, lora=weights, rank=max(w.rank for w in weights.values()),
                      target_modules=tuple(sorted({m for _, m in weights})),
                      base_bias=base_bias,
                      nbytes=sum(w.a.nbytes + w.b.nbytes + (0 if w.bias is None else w.bias.nbytes)
                                 for w in weights.values()) + sum(v.nbytes for v in base_bias.values()))
        adapter._load_extra(base, shapes, handle, keys, targets, dtype)
        return adapter

    def _load_extra(self, base: BaseSpec, shapes: dict, handle: Any, keys: dict, targets: set, dtype) -> None:
        """Variants (DoRA) read their extra tensors here."""

    @classmethod
    def _tensor_keys(cls, shapes: dict, base: BaseSpec, targets: set, config: dict) -> dict[tuple[int, str, str], str]:
        """(layer, module, param) -> tensor name, refusing strays and duplicates; param ``"bias"`` is a
        trained base bias (``bias`` all / lora_only), ``"lora_B.bias"`` lora_B's bias (``lora_bias``)."""
        params = cls.tensor_params + (("lora_B.bias",) if config.get("lora_bias") else ())
        mode = config.get("bias") or "none"
        keys: dict[tuple[int, str, str], str] = {}
        for key in shapes:
            pair = parse_base_bias_key(key, base)
            if pair is not None:
                if mode == "none":
                    raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is a trained base bias, but {CONFIG_NAME} "
                                       "sets bias='none'; the config and weights disagree")
                if mode == "lora_only" and pair not in targets:
                    raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is the bias of a module that target_modules "
                                       f"does not select, but {CONFIG_NAME} sets bias='lora_only'; the config and "
                                       "weights disagree")
                if (*pair, "bias") in keys:
                    raise AdapterError(f"{WEIGHTS_NAME} holds two biases for {base.module_name(*pair)} "
                                       f"({keys[(*pair, 'bias')]!r} and {key!r})")
                keys[(*pair, "bias")] = key
                continue
            layer, module, param = parse_key(key, params, base)
            if (layer, module) not in targets:
                raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is for a module that target_modules in "
                                   f"{CONFIG_NAME} does not select; the config and weights disagree")
            if (layer, module, param) in keys:
                raise AdapterError(f"{WEIGHTS_NAME} holds two {param} tensors for layers.{layer}.{module} "
                                   f"({keys[(layer, module, param)]!r} and {key!r}); save one adapter per directory")
            keys[(layer, module, param)] = key
        for layer, module in sorted(targets):
            for param in params:
                if (layer, module, param) not in keys:
                    hint = " (lora_bias is true)" if param == "lora_B.bias" else cls.missing_hint
                    raise AdapterError(f"{WEIGHTS_NAME} lacks {param} for {base.module_name(layer, module)}, which "
                                       f"target_modules selects{hint}")
        return keys

    def write(self, layers: dict, slot: int) -> None:
        for key, w in self.lora.items():
            layers[key].set_lora(slot, w.a, w.b, w.scaling)
        self._write_extra(layers, slot)
        for key in sorted(set(self.base_bias) | {k for k, w in self.lora.items() if w.bias is not None}):
            w = self.lora.get(key)
            lora_bias = None if w is None or w.bias is None else w.bias.float() * w.scaling
            layers[key].set_bias(slot, lora_bias=lora_bias, new_bias=self.base_bias.get(key))

    def _write_extra(self, layers: dict, slot: int) -> None:
        """Variants (DoRA) write their extra per-layer state here, before the bias terms."""


def _lora_weights(config: dict, base: BaseSpec, shapes: dict, handle: Any, keys: dict, targets: set,
                  max_rank: int, dtype: torch.dtype) -> dict[tuple[int, str], LoraWeights]:
    r_default, alpha_default = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    out: dict[tuple[int, str], LoraWeights] = {}
    for layer, module in sorted(targets):
        full = base.module_name(layer, module)
        r = int(pattern_value(rank_pattern, full, r_default))
        alpha = float(pattern_value(alpha_pattern, full, alpha_default))
        if r > max_rank:
            raise AdapterError(f"LoRA rank {r} of {full} (field {'rank_pattern' if rank_pattern else 'r'} in "
                               f"{CONFIG_NAME}) exceeds this server's max_rank {max_rank}; retrain with a smaller r "
                               "or raise the server's max LoRA rank")
        fan_in, fan_out = base.module_shapes[module]
        ka, kb = keys[(layer, module, "lora_A")], keys[(layer, module, "lora_B")]
        for key, want in ((ka, (r, fan_in)), (kb, (fan_out, r))):
            if shapes[key] != want:
                raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} has shape {list(shapes[key])}, expected "
                                   f"{list(want)} (r={r}, in={fan_in}, out={fan_out}): the adapter does not fit this "
                                   "base, or r/rank_pattern in the config disagree with the weights")
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        kbias = keys.get((layer, module, "lora_B.bias"))
        if kbias is not None and shapes[kbias] != (fan_out,):
            raise AdapterError(f"tensor {kbias!r} in {WEIGHTS_NAME} has shape {list(shapes[kbias])}, expected "
                               f"[{fan_out}] (one bias per output feature); the adapter does not fit this base")
        out[(layer, module)] = LoraWeights(a=load_tensor(handle, ka, dtype), b=load_tensor(handle, kb, dtype),
                                           scaling=scaling,
                                           bias=None if kbias is None else load_tensor(handle, kbias, torch.float32))
    return out


def _base_biases(base: BaseSpec, shapes: dict, handle: Any, keys: dict) -> dict[tuple[int, str], torch.Tensor]:
    """Trained base biases (PEFT ``bias`` all / lora_only): (layer, module) -> new bias [out], fp32."""
    out = {}
    for (layer, module, param), key in sorted(keys.items()):
        if param != "bias":
            continue
        want = (base.module_shapes[module][1],)
        if shapes[key] != want:
            raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} has shape {list(shapes[key])}, expected {list(want)} "
                               "(the bias of that module); the adapter does not fit this base")
        out[(layer, module)] = load_tensor(handle, key, torch.float32)
    return out
