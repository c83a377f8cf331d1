"""MAM (AdapterHub ``MAMConfig``, He et al. 2022): prefix tuning plus a bottleneck adapter, in the library's format.

``adapter_config.json``: ``{"config": {"architecture": "union", "configs": [PREFIX, BN]}, "hidden_size",
"model_class", "model_type", "name", "version"}`` with PREFIX a ``PrefixTuningConfig`` (MAM's default:
``prefix_length`` 30, ``bottleneck_size`` 800, tanh, not flat) and BN any served bottleneck config (MAM's default
is ``par_bn``: relu, reduction 2, scaling 4; see :mod:`adapters.kinds.bottleneck`). The library saves MAM only as
``pytorch_adapter.bin`` (its prefix modules are shared across layers, which safetensors refuses), so the user runs
``adapterctl convert DIR`` first, which writes ``adapter.safetensors`` with every name once.

Weights (adapters 1.3.0, ``name`` the adapter's):
- ``model.prefix_tuning.prefix_tunings.{name}.self_prefix.`` ``wte.weight [P, H]``, ``control_trans.0.weight
  [B, H]`` / ``.0.bias [B]``, ``control_trans.2.weight [L*2*Hkv*D, B]`` / ``.2.bias``; a flat prefix
  (``flat: true``) is one ``control_trans [P*L*2*Hkv*D]`` instead. The same tensors again under
  ``model.layers.{i}.self_attn.prefix_tuning.pool.prefix_tunings.{name}.self_prefix.*`` (the pool every layer
  shares): accepted when equal to the model-level ones.
- the bottleneck's ``model.layers.{i}.{attention|output}_adapters.adapters.{name}.*`` keys.

The prefix K/V are computed once here, in fp32, as the library's ``PrefixTuning.forward`` does:
``control_trans(wte(arange(P)))`` viewed ``[P, 2L, Hkv, D]`` (GQA-aware: the library's ``n_heads`` is
``num_key_value_heads``, its head size ``hidden // num_attention_heads``), layer i's K the pair's first, as PEFT's
``prompt_embeddings``; they are raw cache entries (no rotary embedding). Unlike PEFT's prefix, the library
concatenates them inside attention after the prompt's RoPE, and the prompt's positions start at 0, not at P:
``prefix_shifts_positions`` is False, and the engine gives such rows rope positions = cache positions - P
(``Request.rope_shift``). Refused (400, naming the option): ``leave_out`` on the prefix
(a layer without prefix K/V), any other union (a gated one is UniPELT: adapters.kinds.unipelt).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from adapters.kinds.base import Adapter
from adapters.kinds.bottleneck import ACTIVATIONS, BottleneckAdapter, is_adapterhub
from adapters.peft_files import CONFIG_NAME, HUB_WEIGHTS_NAME, AdapterError, load_tensor
from adapters.peft_targets import BaseSpec

PREFIX_KEY_RE = re.compile(r"(?:model\.)?(?:layers\.(?P<layer>\d+)\.self_attn\.prefix_tuning\.pool|prefix_tuning)\."
                           r"prefix_tunings\.(?P<name>[^.]+)\.self_prefix\.(?P<param>wte\.weight|"
                           r"control_trans\.0\.weight|control_trans\.0\.bias|control_trans\.2\.weight|"
                           r"control_trans\.2\.bias|control_trans)")
# PrefixTuningConfig fields with no effect on a decoder-only eval forward.
_PREFIX_IGNORED = {"architecture", "encoder_prefix", "cross_prefix", "dropout", "init_weights_seed", "shared_gating"}
# The library's activation names (transformers ACT2FN) for ACTIVATIONS, as server.model.bottleneck_layers runs them.
ACTIVATION_FNS = {"relu": torch.relu, "swish": torch.nn.functional.silu, "silu": torch.nn.functional.silu,
                  "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}
_PREFIX_KNOWN = _PREFIX_IGNORED | {"flat", "prefix_length", "bottleneck_size", "non_linearity", "leave_out",
                                   "use_gating"}


def _union(config: dict) -> list | None:
    inner = config.get("config")
    return inner.get("configs") if isinstance(inner, dict) and inner.get("architecture") == "union" else None


@dataclass
class MamAdapter(Adapter):
    """``prefix``: ``[layers, 2, Hkv, P, D]`` (as :class:`adapters.kinds.prefix.PrefixAdapter`); ``bottleneck``:
    the union's bottleneck part, written into the slot's bottleneck state."""

    prefix: torch.Tensor | None = None
    bottleneck: BottleneckAdapter | None = None

    kind: ClassVar[str] = "mam"
    layer_state: ClassVar[frozenset[str]] = frozenset({"bottleneck"})
    mergeable: ClassVar[bool] = False
    prefix_shifts_positions: ClassVar[bool] = False

    @classmethod
    def matches(cls, config: dict) -> bool:
        return is_adapterhub(config) and _union(config) is not None

    @staticmethod
    def parts(config: dict) -> tuple[dict, dict]:
        """(the prefix-tuning config, the bottleneck adapter's config as a whole AdapterHub config)."""
        configs = _union(config) or []
        # the library saves a bottleneck config without its architecture field
        kinds = [(c.get("architecture") or "bottleneck") if isinstance(c, dict) else repr(c) for c in configs]
        if sorted(kinds) != ["bottleneck", "prefix_tuning"]:
            raise AdapterError(f"{CONFIG_NAME} is an AdapterHub union of {kinds}: of the unions only MAM (prefix_tuning "
                               "+ a bottleneck adapter) is served")
        prefix = configs[kinds.index("prefix_tuning")]
        return prefix, {**config, "config": configs[kinds.index("bottleneck")]}

    @classmethod
    def check_config(cls, config: dict) -> None:
        prefix, bn = cls.parts(config)
        if any(c.get("use_gating") for c in _union(config)):
            raise AdapterError(f"{CONFIG_NAME} sets use_gating=true in its union: a gated union is UniPELT "
                               "(adapters.kinds.unipelt), not MAM")
        BottleneckAdapter.check_config(bn)
        check_prefix_config(prefix)

    @classmethod
    def virtual_tokens(cls, config: dict) -> int:
        return int(cls.parts(config)[0]["prefix_length"])

    @classmethod
    def inspect(cls, config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[str]]:
        bn_shapes = {k: s for k, s in shapes.items() if not PREFIX_KEY_RE.fullmatch(k)}
        width, places = BottleneckAdapter.inspect(cls.parts(config)[1], bn_shapes)
        return width, sorted(places + ["prefix_tuning"])

    @classmethod
    def load(cls, name: str, config: dict, base: BaseSpec, shapes: dict, handle: Any, *, max_rank: int,
             dtype: torch.dtype) -> "MamAdapter":
        prefix_cfg, bn_cfg = cls.parts(config)
        prefix_keys = {k for k in shapes if PREFIX_KEY_RE.fullmatch(k)}
        bottleneck = BottleneckAdapter.load(name, bn_cfg, base, {k: s for k, s in shapes.items()
                                                                 if k not in prefix_keys}, handle,
                                            max_rank=max_rank, dtype=dtype)
        kv = cls._prefix_kv(prefix_cfg, base, shapes, prefix_keys, handle)
        prefix = kv.to(dtype).contiguous()
        return cls(name=name, config=config, prefix=prefix, bottleneck=bottleneck,
                   num_virtual_tokens=int(prefix.shape[3]), rank=bottleneck.rank,
                   target_modules=tuple(sorted(bottleneck.target_modules + ("prefix_tuning",))),
                   nbytes=bottleneck.nbytes + prefix.nbytes)

    @staticmethod
    def _prefix_kv(prefix_cfg: dict, base: BaseSpec, shapes: dict, keys: set[str], handle: Any) -> torch.Tensor:
        """[layers, 2, Hkv, P, D] in fp32 from the model-level prefix module (per-layer copies must equal it)."""
        if base.head_dim * base.num_heads != base.hidden_size:
            raise AdapterError(f"this base's head_dim {base.head_dim} is not hidden_size / num_attention_heads; the "
                               "library's prefix tuning assumes it is, so its prefix cannot be placed here")
        n, layers, hkv, d = prefix_cfg["prefix_length"], base.num_layers, base.num_kv_heads, base.head_dim
        flat = bool(prefix_cfg.get("flat"))
        params = ("control_trans",) if flat else ("wte.weight", "control_trans.0.weight", "control_trans.0.bias",
                                                  "control_trans.2.weight", "control_trans.2.bias")
        bottleneck = prefix_cfg.get("bottleneck_size")
        out = layers * 2 * hkv * d
        want = ({"control_trans": (n * out,)} if flat else
                {"wte.weight": (n, base.hidden_size), "control_trans.0.weight": (bottleneck, base.hidden_size),
                 "control_trans.0.bias": (bottleneck,), "control_trans.2.weight": (out, bottleneck),
                 "control_trans.2.bias": (out,)})
        model_level: dict[str, str] = {}
        copies: list[tuple[str, str]] = []
        names = set()
        for key in keys:
            m = PREFIX_KEY_RE.fullmatch(key)
            names.add(m["name"])
            if m["param"] not in params:
                raise AdapterError(f"unexpected tensor {key!r} in {HUB_WEIGHTS_NAME}: a "
                                   f"{'flat' if flat else 'reparametrized'} prefix holds {', '.join(params)}")
            if m["layer"] is not None and int(m["layer"]) >= layers:
                raise AdapterError(f"tensor {key!r} in {HUB_WEIGHTS_NAME} is for layer {m['layer']}, out of range for "
                                   f"this {layers}-layer base")
            if tuple(shapes[key]) != want[m["param"]]:
                raise AdapterError(
                    f"tensor {key!r} in {HUB_WEIGHTS_NAME} has shape {list(shapes[key])}, expected "
                    f"{list(want[m['param']])} (prefix_length {n}, layers {layers}, kv heads {hkv}, head dim {d}); "
                    "the prefix was made for another base")
            (copies.append((m["param"], key)) if m["layer"] is not None else model_level.__setitem__(m["param"], key))
        if len(names) > 1:
            raise AdapterError(f"{HUB_WEIGHTS_NAME} holds the prefixes {sorted(names)}; save one adapter per directory")
        missing = [p for p in params if p not in model_level]
        if missing:
            raise AdapterError(f"{HUB_WEIGHTS_NAME} lacks the prefix tensor model.prefix_tuning.prefix_tunings.<name>."
                               f"self_prefix.{missing[0]}")
        get = {p: load_tensor(handle, k, torch.float32) for p, k in model_level.items()}
        for param, key in copies:
            if not torch.equal(load_tensor(handle, key, torch.float32), get[param]):
                raise AdapterError(f"tensor {key!r} in {HUB_WEIGHTS_NAME} differs from the model-level prefix "
                                   f"{model_level[param]!r}; the library shares one prefix module across layers")
        if flat:
            kv = get["control_trans"].view(n, out)
        else:
            act = ACTIVATION_FNS[prefix_cfg.get("non_linearity", "tanh").lower()]
            hidden = act(torch.nn.functional.linear(get["wte.weight"], get["control_trans.0.weight"],
                                                    get["control_trans.0.bias"]))
            kv = torch.nn.functional.linear(hidden, get["control_trans.2.weight"], get["control_trans.2.bias"])
        if not kv.any():
            raise AdapterError(f"the prefix in {HUB_WEIGHTS_NAME} is all zeros: this adapter is untrained")
        # [P, 2L*Hkv*D] -> [P, 2L, Hkv, D] -> [2L, Hkv, P, D] (the library's permute, batch dropped) -> [L, 2, ...]
        return kv.view(n, 2 * layers, hkv, d).permute(1, 2, 0, 3).reshape(layers, 2, hkv, n, d)

    def write(self, layers: dict, slot: int) -> None:
        self.bottleneck.write(layers, slot)

    def prefix_kv(self) -> torch.Tensor | None:
        return self.prefix



def check_prefix_config(prefix: dict) -> None:
    """The checks of an AdapterHub ``PrefixTuningConfig`` inside a union (MAM's, UniPELT's), 400 naming the field."""
    unknown = sorted(set(prefix) - _PREFIX_KNOWN)
    if unknown:
        raise AdapterError(f"{CONFIG_NAME} sets the prefix-tuning option {unknown[0]}={prefix[unknown[0]]!r}, "
                           "which this server does not know and so cannot serve exactly")
    if prefix.get("leave_out"):
        raise AdapterError(f"{CONFIG_NAME} sets the prefix-tuning option leave_out={prefix['leave_out']!r}: "
                           "a prefix on only some layers is not served")
    for key in ("prefix_length",) + (() if prefix.get("flat") else ("bottleneck_size",)):
        value = prefix.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{CONFIG_NAME} prefix-tuning field {key} must be a positive integer, got {value!r}")
    act = prefix.get("non_linearity", "tanh")
    if not prefix.get("flat") and (not isinstance(act, str) or act.lower() not in ACTIVATIONS):
        raise AdapterError(f"{CONFIG_NAME} sets the prefix-tuning non_linearity={act!r}; served are "
                           f"{', '.join(ACTIVATIONS)}")
