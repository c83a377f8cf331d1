"""Bottleneck adapters in AdapterHub's save format (``adapters`` 1.3.0): houlsby, pfeiffer, parallel.

Directory: ``adapter_config.json`` = ``{"config": {...BnConfig...}, "hidden_size", "model_class",
"model_type", "name", "version"}`` and ``adapter.safetensors`` (``save_adapter(..., use_safetensors=True)``).
Weights per decoder layer i and place (``attention`` after the attention block when ``mh_adapter``,
``output`` after the MLP when ``output_adapter``):
``model.layers.{i}.{attention|output}_adapters.adapters.{name}.adapter_down.0.weight [r, H]`` (and ``.bias``
[r]), ``.adapter_up.weight [H, r]`` (and ``.bias`` [H]); biases may be absent (zero).

Semantics (the library's ``Adapter`` / ``ParallelAdapter`` pre_forward / forward / post_forward with the
Llama block's ``layer_norm=None``; Qwen2's hooked layers give the same), f(x) = W_up act(W_down x + b_down) + b_up,
s the sublayer output (o_proj's or the MLP's), r the block's residual input:

* ``is_parallel`` (par_bn): ``out = r + s + scaling * f(r)``;
* sequential, ``original_ln_before`` (seq_bn, Pfeiffer): ``out = r + s + scaling * f(s + r)``;
* sequential otherwise (double_seq_bn, Houlsby): ``out = r + s + scaling * f(s)``.

Width ``r = int(hidden // reduction_factor)`` (a per-layer mapping with "default" as the library reads it,
at least 1), read from the weights and checked against the config. Refused (400, naming the option): anything
the server does not compute (layer norms inside the adapter, PHM layers, invertible adapters, gating, learned
scaling, residual or layer-norm orders other than the library's defaults for the Llama block). Served through
server.model.bottleneck_layers; never merged into W (``mergeable`` is False).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from adapters.kinds.base import Adapter
from adapters.peft_files import CONFIG_NAME, HUB_WEIGHTS_NAME, AdapterError, load_tensor
from adapters.peft_targets import BaseSpec

HUB_MODEL_TYPES = ("llama", "mistral", "qwen2")
ACTIVATIONS = ("relu", "swish", "silu", "gelu", "tanh")  # server.model.bottleneck_layers.ACTIVATIONS
PLACES = {"attention": "attn", "output": "out"}
KEY_RE = re.compile(r"(?:model\.)?layers\.(?P<layer>\d+)\.(?P<place>attention|output)_adapters\.adapters\."
                    r"(?P<name>[^.]+)\.(?P<param>adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|"
                    r"adapter_up\.bias)")
# Top-level fields of an AdapterHub adapter_config.json.
_HUB_TOP = {"config", "hidden_size", "model_class", "model_type", "model_name", "name", "version"}
# BnConfig fields with no effect on an eval forward (or only when another, refused, option is on).
_IGNORED = {"architecture", "init_weights", "init_weights_seed", "dropout", "stochastic_depth", "phm_dim",
            "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init",
            "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank", "phm_bias",
            "inv_adapter_reduction_factor", "adapter_residual_before_ln"}  # the last: no effect without ln_after
# Fields that must hold exactly this value: (value, why the server refuses another).
_REQUIRED = {
    "ln_before": (False, "a layer norm inside the adapter (ln_before) is not served"),
    "ln_after": (False, "a layer norm inside the adapter (ln_after) is not served"),
    "phm_layer": (False, "PHM (Compacter) layers are not served"),
    "inv_adapter": (None, "invertible adapters change the embeddings and are not served"),
    "cross_adapter": (False, "cross-attention adapters need an encoder-decoder model"),
    "use_gating": (False, "a gated bottleneck is served only inside UniPELT (adapters.kinds.unipelt)"),
    "original_ln_after": (True, "original_ln_after=false drops the block's residual; not served"),
    "residual_before_ln": (True, "residual orders other than the library's default (true) are not served"),
}
_KNOWN = _IGNORED | set(_REQUIRED) | {"mh_adapter", "output_adapter", "reduction_factor", "non_linearity",
                                      "original_ln_before", "is_parallel", "scaling", "leave_out"}


def is_adapterhub(config: dict) -> bool:
    """An AdapterHub ``adapter_config.json`` (its settings nested under "config", no peft_type)."""
    return isinstance(config.get("config"), dict) and "peft_type" not in config


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def expected_width(config: dict, hidden: int, layer: int) -> int:
    """The library's width: ``int(hidden // reduction_factor)`` (per-layer mapping, "default"), at least 1."""
    rf = config["reduction_factor"]
    if isinstance(rf, Mapping):
        rf = rf.get(str(layer), rf.get("default"))
    return max(1, int(hidden // rf))


@dataclass
class BottleneckWeights:
    """One adapter at one (layer, place): down [r, H], up [H, r], biases [r] / [H] or None."""

    down: torch.Tensor
    up: torch.Tensor
    down_bias: torch.Tensor | None
    up_bias: torch.Tensor | None

    @property
    def width(self) -> int:
        return int(self.down.shape[0])


@dataclass
class BottleneckAdapter(Adapter):
    """``blocks``: (layer, place "attn" | "out") -> weights; ``rank`` is the largest width."""

    blocks: dict[tuple[int, str], BottleneckWeights] = field(default_factory=dict)
    activation: str = "relu"
    scaling: float = 1.0
    reads: str = "sublayer"  # server.model.bottleneck_layers.INPUTS
    variant: str = ""

    kind: ClassVar[str] = "bottleneck"
    layer_state: ClassVar[frozenset[str]] = frozenset({"bottleneck"})
    mergeable: ClassVar[bool] = False

    @classmethod
    def matches(cls, config: dict) -> bool:
        return is_adapterhub(config)

    @classmethod
    def check_config(cls, config: dict) -> None:
        unknown = sorted(set(config) - _HUB_TOP)
        if unknown:
            raise AdapterError(f"{CONFIG_NAME} has the field {unknown[0]!r}, which an AdapterHub adapter config "
                               "does not hold")
        if config.get("model_type") not in HUB_MODEL_TYPES:
            raise AdapterError(f"{CONFIG_NAME} field model_type is {config.get('model_type')!r}; bottleneck "
                               f"adapters are served for {', '.join(HUB_MODEL_TYPES)} models")
        bn = config["config"]
        arch = bn.get("architecture")
        if arch not in (None, "bottleneck"):
            raise AdapterError(f"{CONFIG_NAME} sets config.architecture={arch!r}: of AdapterHub's methods only "
                               "bottleneck adapters (houlsby, pfeiffer, parallel) are served")
        unknown = sorted(set(bn) - _KNOWN)
        if unknown:
            raise AdapterError(f"{CONFIG_NAME} sets config.{unknown[0]}={bn[unknown[0]]!r}, an option this server "
                               "does not know for bottleneck adapters and so cannot serve exactly")
        for key, (want, why) in _REQUIRED.items():
            if key in bn and bn[key] != want:
                raise AdapterError(f"{CONFIG_NAME} sets config.{key}={bn[key]!r}: {why}")
        for key in ("mh_adapter", "output_adapter", "original_ln_before", "is_parallel"):
            if not isinstance(bn.get(key, False), bool):
                raise AdapterError(f"{CONFIG_NAME} field config.{key} must be true or false, got {bn[key]!r}")
        if not bn.get("mh_adapter") and not bn.get("output_adapter"):
            raise AdapterError(f"{CONFIG_NAME} sets neither config.mh_adapter nor config.output_adapter: the adapter "
                               "would change nothing")
        act = bn.get("non_linearity")
        if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
            raise AdapterError(f"{CONFIG_NAME} sets config.non_linearity={act!r}; served are "
                               f"{', '.join(ACTIVATIONS)}")
        if not _number(bn.get("scaling", 1.0)):
            raise AdapterError(f"{CONFIG_NAME} sets config.scaling={bn['scaling']!r}: only a fixed number is "
                               "served (learned and channel scaling are not)")
        rf = bn.get("reduction_factor")
        values = list(rf.values()) if isinstance(rf, Mapping) else [rf]
        if not values or not all(_number(v) and v > 0 for v in values):
            raise AdapterError(f"{CONFIG_NAME} field config.reduction_factor must be a positive number or a mapping "
                               f"of layer -> positive number, got {rf!r}")
        leave_out = bn.get("leave_out") or []
        if not isinstance(leave_out, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                      for i in leave_out):
            raise AdapterError(f"{CONFIG_NAME} field config.leave_out must be a list of layer indices")

    @classmethod
    def inspect(cls, config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[str]]:
        width, places = 0, set()
        for key, shape in shapes.items():
            m = KEY_RE.fullmatch(key)
            if not m:
                raise AdapterError(f"unexpected tensor {key!r} in {HUB_WEIGHTS_NAME}: not a bottleneck adapter weight")
            places.add(f"{m['place']}_adapters")
            if m["param"] == "adapter_down.0.weight" and len(shape) == 2:
                width = max(width, shape[0])
        return int(width), sorted(places)

    @classmethod
    def load(cls, name: str, config: dict, base: BaseSpec, shapes: dict, handle: Any, *, max_rank: int,
             dtype: torch.dtype) -> "BottleneckAdapter":
        bn, hidden = config["config"], base.hidden_size
        if config.get("hidden_size") not in (None, hidden):
            raise AdapterError(f"{CONFIG_NAME} field hidden_size is {config['hidden_size']} but the loaded base's is "
                               f"{hidden}; the adapter was made for another base")
        places = [p for p, flag in (("attention", "mh_adapter"), ("output", "output_adapter")) if bn.get(flag)]
        leave_out = set(bn.get("leave_out") or [])
        wanted = {(i, p) for i in range(base.num_layers) if i not in leave_out for p in places}
        keys: dict[tuple[int, str, str], str] = {}
        names = set()
        for key in shapes:
            m = KEY_RE.fullmatch(key)
            if not m:
                raise AdapterError(f"unexpected tensor {key!r} in {HUB_WEIGHTS_NAME}: not a bottleneck adapter weight")
            layer, place = int(m["layer"]), m["place"]
            if (layer, place) not in wanted:
                why = (f"layer {layer} is out of range for this {base.num_layers}-layer base" if layer >= base.num_layers
                       else f"{CONFIG_NAME} places no adapter there (mh_adapter / output_adapter / leave_out)")
                raise AdapterError(f"tensor {key!r} in {HUB_WEIGHTS_NAME} is unexpected: {why}")
            names.add(m["name"])
            keys[(layer, place, m["param"])] = key
        if len(names) > 1:
            raise AdapterError(f"{HUB_WEIGHTS_NAME} holds the adapters {sorted(names)}; save one adapter per directory")
        blocks: dict[tuple[int, str], BottleneckWeights] = {}
        for layer, place in sorted(wanted):
            for param in ("adapter_down.0.weight", "adapter_up.weight"):
                if (layer, place, param) not in keys:
                    raise AdapterError(f"{HUB_WEIGHTS_NAME} lacks {param} of the {place} adapter of layer {layer}, "
                                       f"which {CONFIG_NAME} places there")
            width = expected_width(bn, hidden, layer)
            want_shapes = {"adapter_down.0.weight": (width, hidden), "adapter_down.0.bias": (width,),
                           "adapter_up.weight": (hidden, width), "adapter_up.bias": (hidden,)}
            for param, want in want_shapes.items():
                key = keys.get((layer, place, param))
                if key is not None and tuple(shapes[key]) != want:
                    raise AdapterError(
                        f"tensor {key!r} in {HUB_WEIGHTS_NAME} has shape {list(shapes[key])}, but hidden size {hidden} "
                        f"and config.reduction_factor {bn['reduction_factor']!r} give {list(want)} "
                        f"(width int({hidden} // reduction_factor) = {width})")
            if width > max_rank:
                raise AdapterError(f"the bottleneck width {width} (layer {layer}) is above this server's "
                                   f"--max-lora-rank {max_rank} (alias --max-adapter-width); raise it or use a larger "
                                   "reduction_factor")
            get = lambda p: (None if (layer, place, p) not in keys  # noqa: E731
                             else load_tensor(handle, keys[(layer, place, p)], dtype))
            blocks[(layer, PLACES[place])] = BottleneckWeights(down=get("adapter_down.0.weight"),
                                                               up=get("adapter_up.weight"),
                                                               down_bias=get("adapter_down.0.bias"),
                                                               up_bias=get("adapter_up.bias"))
        if not blocks:
            raise AdapterError(f"{CONFIG_NAME} config.leave_out leaves out every layer: the adapter changes nothing")
        if all(not w.up.any() and (w.up_bias is None or not w.up_bias.any()) for w in blocks.values()):
            raise AdapterError(f"every adapter_up in {HUB_WEIGHTS_NAME} is all zeros: this adapter is untrained "
                               "and would change nothing; upload the trained adapter")
        reads = "residual" if bn.get("is_parallel") else "sum" if bn.get("original_ln_before") else "sublayer"
        variant = {"residual": "parallel", "sum": "pfeiffer", "sublayer": "houlsby"}[reads]
        return cls(name=name, config=config, blocks=blocks, activation=bn["non_linearity"].lower(),
                   scaling=float(bn.get("scaling", 1.0)), reads=reads, variant=variant,
                   rank=max(w.width for w in blocks.values()),
                   target_modules=tuple(sorted({f"{p}_adapters" for p in places})),
                   nbytes=sum(t.nbytes for w in blocks.values()
                              for t in (w.down, w.up, w.down_bias, w.up_bias) if t is not None))

    def write(self, layers: dict, slot: int) -> None:
        for (layer, place), w in self.blocks.items():
            layers.bottleneck[layer].set_adapter(slot, place, w.down, w.down_bias, w.up, w.up_bias, self.activation,
                                                 self.scaling, self.reads)


def check_saved_head(path, lm_head: torch.Tensor | None) -> bool:
    """A saved prediction head (``model_head.safetensors`` in ``path``, from ``save_adapter(..., with_head=True)``
    through ``adapterctl convert``) must equal the base's lm_head weight [V, H]: the server serves the base's
    head, so a different head would be silently dropped. Equal means every [V, H] tensor of the file matches
    within the base's dtype (its rounding: the library saves fp32). Returns True when a head was present (and
    equal), False when there is none; raises AdapterError otherwise."""
    from pathlib import Path

    from safetensors import safe_open

    from adapters.peft_files import HUB_SAFE_HEAD_NAME

    file = Path(path) / HUB_SAFE_HEAD_NAME
    if not file.is_file():
        return False
    drop = "save the adapter with save_adapter(..., with_head=False), or upload it without head files"
    if lm_head is None:
        raise AdapterError(f"{HUB_SAFE_HEAD_NAME} is a saved prediction head, and this server's lm_head is quantized "
                           f"or packed, so the head cannot be compared with it; {drop}")
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weights = {k: t for k, t in tensors.items() if k.endswith("weight")}
    if not weights or len(weights) != len(tensors):
        extra = sorted(set(tensors) - set(weights))
        raise AdapterError(f"{HUB_SAFE_HEAD_NAME} holds {extra[0] if extra else 'no weight'}: a head other than a "
                           f"plain lm_head is not served; {drop}")
    want = lm_head.detach().float().cpu()
    for key, t in weights.items():
        if tuple(t.shape) != tuple(want.shape):
            raise AdapterError(f"{HUB_SAFE_HEAD_NAME} tensor {key!r} has shape {list(t.shape)}, but the base's "
                               f"lm_head is {list(want.shape)}: this head is not the base's; {drop}")
        if not torch.equal(t.to(lm_head.dtype).float(), want):
            diff = float((t.float() - want).abs().max())
            raise AdapterError(f"{HUB_SAFE_HEAD_NAME} tensor {key!r} differs from the base's lm_head (max "
                               f"|difference| {diff:.3g}): the adapter was trained with its own head, which this "
                               f"server does not serve; {drop}")
    return True
