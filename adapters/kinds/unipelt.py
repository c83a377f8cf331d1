"""UniPELT (AdapterHub ``UniPELTConfig``, Mao et al. 2022): gated prefix tuning + a gated bottleneck + gated LoRA.

``adapter_config.json``: ``{"config": {"architecture": "union", "configs": [PREFIX, BN, LORA]}, "hidden_size",
"model_class", "model_type", "name", "version"}``, every part with ``use_gating: true`` (UniPELTConfig's defaults:
prefix_length 10, bottleneck_size 512, tanh; ``seq_bn`` reduction 16; LoRA r 8, alpha 2 on q and v). The library
saves it only as ``pytorch_adapter.bin`` (its prefix module is shared across layers); ``adapterctl convert DIR``
writes ``adapter.safetensors``.

Weights (adapters 1.3.0; name the adapter's; i a layer):
- the prefix as MAM's (:mod:`adapters.kinds.mam`), and its gate ``model.layers.{i}.self_attn.prefix_tuning.
  prefix_gates.{name}.weight [G, H]`` / ``.bias [G]``, G = 1 with ``shared_gating`` (keys and values), else 2;
- the bottleneck's keys (:mod:`adapters.kinds.bottleneck`) plus ``...{attention|output}_adapters.adapters.{name}.
  gate.weight [1, H]`` / ``.bias [1]``;
- LoRA ``model.layers.{i}.self_attn.{q|k|v}_proj.loras.{name}.lora_A [r, in]``, ``.lora_B [out, r]``,
  ``.gate.weight [1, in]``, ``.gate.bias [1]``.

The library's formulas (methods/lora.py ``LoRA.forward``, methods/modeling.py ``Adapter.forward``,
methods/prefix_tuning.py ``PrefixTuningLayer.compose_single``), each gate ``G(x) = mean over the sequence of
sigmoid(gate(x))`` [B, 1]:
- LoRA on a linear with input x: ``y = W x + b + G(x) * B A x`` (under gating alpha / r is *not* applied);
- bottleneck reading x (seq_bn: x = s + r): ``out = r + s + G(x) * scaling * f(x)``;
- prefix, with x the attention input (after input_layernorm): keys ``G_k(x) * K_p``, values ``G_v(x) * V_p``
  (G_k = G_v with shared gating), concatenated before the prompt's after RoPE, the prompt's positions from 0.

**Served semantics: a per-token gate.** Each token t uses its own ``g(x_t) = sigmoid(gate(x_t))`` where the
library uses the mean over the sequence. The mean cannot be served: the library's full recomputation re-averages
every gate over the whole sequence at every generated token, so a generated token changes the gates (and so the
K/V) of every earlier token, which no KV cache can keep. A prompt-mean gate fixed at prefill would need the whole
prompt before the first layer's gated LoRA of any token, so it breaks under chunked prefill (a chunk sees only
its part) and under prefix-cache hits (the cached part is not recomputed, so its hidden states are not there),
and folding it into the prefix K/V in the cache would make the cache depend on the prompt, not on the adapter
alone. A per-token gate depends on each token's own hidden state only: exact under chunked prefill, prefix
caching keyed by adapter, preemption and continuous batching, and batched with every other kind. Per token:
- LoRA: ``y_t = W x_t + b + g(x_t) B A x_t``, served as LoRA on ``g(x_t) x_t`` (AdapterLinear.set_gate);
- bottleneck: ``out_t = r_t + s_t + g(x_t) * scaling * f(x_t)`` (BottleneckSlots.set_gate);
- prefix: query t's logits to the prefix columns times g_k(x_t) and its attention weights on them times g_v(x_t)
  (server.model.gate_layers), the prefix K/V raw in the cache at positions 0..P-1 and the prompt's rope positions
  from 0 (``prefix_shifts_positions`` False, as MAM).
Measured against the library's unmodified full recomputation (tests/test_unipelt.py prints it): see README.

Refused (400, naming the option): a union other than these three parts, a part without ``use_gating``, LoRA
outside q/k/v of the attention (``intermediate_lora``, ``output_lora``, other ``attn_matrices``), DoRA, VeRA,
``composition_mode`` other than add, a prefix ``leave_out``, and the bottleneck refusals. UniPELT is not composed
with other adapters (adapters.composition has no family for it) and never merged (``mergeable`` False).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from adapters.kinds.base import Adapter
from adapters.kinds.bottleneck import PLACES, BottleneckAdapter, is_adapterhub
from adapters.kinds.mam import PREFIX_KEY_RE, MamAdapter, check_prefix_config
from adapters.peft_files import CONFIG_NAME, HUB_WEIGHTS_NAME, AdapterError, load_tensor
from adapters.peft_targets import BaseSpec

LORA_KEY_RE = re.compile(r"(?:model\.)?layers\.(?P<layer>\d+)\.self_attn\.(?P<module>[qkv]_proj)\.loras\."
                         r"(?P<name>[^.]+)\.(?P<param>lora_A|lora_B|gate\.weight|gate\.bias)")
BN_GATE_RE = re.compile(r"(?:model\.)?layers\.(?P<layer>\d+)\.(?P<place>attention|output)_adapters\.adapters\."
                        r"(?P<name>[^.]+)\.gate\.(?P<param>weight|bias)")
PREFIX_GATE_RE = re.compile(r"(?:model\.)?layers\.(?P<layer>\d+)\.self_attn\.prefix_tuning\.prefix_gates\."
                            r"(?P<name>[^.]+)\.(?P<param>weight|bias)")
# LoRAConfig fields: no effect on an eval forward, or required values (value, why another is refused).
_LORA_IGNORED = {"architecture", "alpha", "dropout", "init_weights", "init_weights_seed", "use_gating"}
_LORA_REQUIRED = {
    "selfattn_lora": (True, "UniPELT's LoRA is served on the attention's q/k/v only"),
    "intermediate_lora": (False, "LoRA on the MLP (intermediate_lora) is not served in UniPELT"),
    "output_lora": (False, "LoRA on the MLP (output_lora) is not served in UniPELT"),
    "composition_mode": ("add", "only composition_mode 'add' is LoRA"),
    "use_dora": (False, "DoRA inside UniPELT is not served"),
    "dtype": (None, "a LoRA dtype of its own is not served"),
    "vera_b": (None, "VeRA is not served"),
    "vera_d": (None, "VeRA is not served"),
}
_LORA_KNOWN = _LORA_IGNORED | set(_LORA_REQUIRED) | {"r", "attn_matrices", "leave_out"}


def _union(config: dict) -> list | None:
    inner = config.get("config")
    return inner.get("configs") if isinstance(inner, dict) and inner.get("architecture") == "union" else None


def _kinds(configs: list) -> list[str]:
    # the library saves a bottleneck config without its architecture field
    return [(c.get("architecture") or "bottleneck") if isinstance(c, dict) else repr(c) for c in configs]


@dataclass
class UnipeltAdapter(Adapter):
    """``prefix`` [layers, 2, Hkv, P, D] (MAM's), ``prefix_gates`` layer -> (weight [G, H], bias [G]),
    ``bottleneck`` with ``bottleneck_gates`` (layer, place) -> (weight [1, H], bias [1]), ``lora`` (layer, module)
    -> (A [r, in], B [out, r], gate weight [1, in], gate bias [1])."""

    prefix: torch.Tensor | None = None
    prefix_gates: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    bottleneck: BottleneckAdapter | None = None
    bottleneck_gates: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora: dict[tuple[int, str], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    kind: ClassVar[str] = "unipelt"
    layer_state: ClassVar[frozenset[str]] = frozenset({"lora", "bottleneck"})
    mergeable: ClassVar[bool] = False
    prefix_shifts_positions: ClassVar[bool] = False

    @classmethod
    def matches(cls, config: dict) -> bool:
        configs = _union(config) if is_adapterhub(config) else None
        return configs is not None and ("lora" in _kinds(configs)
                                        or any(isinstance(c, dict) and c.get("use_gating") for c in configs))

    @staticmethod
    def parts(config: dict) -> tuple[dict, dict, dict]:
        """(the prefix-tuning config, the bottleneck's as a whole AdapterHub config, the LoRA config)."""
        configs = _union(config) or []
        kinds = _kinds(configs)
        if sorted(kinds) != ["bottleneck", "lora", "prefix_tuning"]:
            gated = " with use_gating=true" if any(isinstance(c, dict) and c.get("use_gating") for c in configs) else ""
            raise AdapterError(f"{CONFIG_NAME} is an AdapterHub union of {kinds}{gated}: of the unions only MAM "
                               "(prefix_tuning + a bottleneck adapter) and UniPELT (prefix_tuning + a bottleneck adapter "
                               "+ lora, each gated) are served; a union with LoRA or gates is served only as UniPELT")
        for kind, part in zip(kinds, configs):
            if part.get("use_gating") is not True:
                raise AdapterError(f"{CONFIG_NAME} sets use_gating={part.get('use_gating')!r} on its {kind} part: "
                                   "UniPELT's parts are all gated, and a partly gated union is not served")
        get = lambda kind: configs[kinds.index(kind)]  # noqa: E731
        return get("prefix_tuning"), {**config, "config": {**get("bottleneck"), "use_gating": False}}, get("lora")

    @classmethod
    def check_config(cls, config: dict) -> None:
        prefix, bn, lora = cls.parts(config)
        BottleneckAdapter.check_config(bn)
        check_prefix_config(prefix)
        if not isinstance(prefix.get("shared_gating", True), bool):
            raise AdapterError(f"{CONFIG_NAME} prefix-tuning field shared_gating must be true or false")
        unknown = sorted(set(lora) - _LORA_KNOWN)
        if unknown:
            raise AdapterError(f"{CONFIG_NAME} sets the LoRA option {unknown[0]}={lora[unknown[0]]!r}, which this "
                               "server does not know and so cannot serve exactly")
        for key, (want, why) in _LORA_REQUIRED.items():
            if key in lora and lora[key] != want:
                raise AdapterError(f"{CONFIG_NAME} sets the LoRA option {key}={lora[key]!r}: {why}")
        if lora.get("init_weights", "lora") == "vera":
            raise AdapterError(f"{CONFIG_NAME} sets the LoRA option init_weights='vera': VeRA is not served")
        matrices = lora.get("attn_matrices", ["q", "v"])
        if not isinstance(matrices, list) or not matrices or not set(matrices) <= {"q", "k", "v"}:
            raise AdapterError(f"{CONFIG_NAME} sets the LoRA option attn_matrices={matrices!r}: served are "
                               "non-empty subsets of q, k, v")
        r = lora.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise AdapterError(f"{CONFIG_NAME} LoRA field r must be a positive integer, got {r!r}")
        leave_out = lora.get("leave_out") or []
        if not isinstance(leave_out, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                      for i in leave_out):
            raise AdapterError(f"{CONFIG_NAME} LoRA field leave_out must be a list of layer indices")

    @classmethod
    def virtual_tokens(cls, config: dict) -> int:
        return int(cls.parts(config)[0]["prefix_length"])

    @classmethod
    def inspect(cls, config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[str]]:
        prefix, lora, gates, bn = cls._split(shapes)
        width, places = BottleneckAdapter.inspect(cls.parts(config)[1], bn)
        rank = max([s[0] for k, s in lora.items() if k.endswith("lora_A") and len(s) == 2] or [0])
        modules = {LORA_KEY_RE.fullmatch(k)["module"] for k in lora}
        return max(width, rank), sorted(set(places) | modules | {"prefix_tuning"})

    @staticmethod
    def _split(shapes: dict) -> tuple[dict, dict, dict, dict]:
        """(prefix module keys, LoRA keys, bottleneck and prefix gate keys, the rest: the bottleneck's)."""
        out: tuple[dict, dict, dict, dict] = ({}, {}, {}, {})
        for key, shape in shapes.items():
            which = (0 if PREFIX_KEY_RE.fullmatch(key) else 1 if LORA_KEY_RE.fullmatch(key)
                     else 2 if BN_GATE_RE.fullmatch(key) or PREFIX_GATE_RE.fullmatch(key) else 3)
            out[which][key] = shape
        return out

    @classmethod
    def load(cls, name: str, config: dict, base: BaseSpec, shapes: dict, handle: Any, *, max_rank: int,
             dtype: torch.dtype) -> "UnipeltAdapter":
        prefix_cfg, bn_cfg, lora_cfg = cls.parts(config)
        prefix_keys, lora_keys, gate_keys, bn_keys = cls._split(shapes)
        bottleneck = BottleneckAdapter.load(name, bn_cfg, base, bn_keys, handle, max_rank=max_rank, dtype=dtype)
        kv = MamAdapter._prefix_kv(prefix_cfg, base, shapes, set(prefix_keys), handle)
        names = {m["name"] for k in list(lora_keys) + list(gate_keys)
                 for m in [LORA_KEY_RE.fullmatch(k) or BN_GATE_RE.fullmatch(k) or PREFIX_GATE_RE.fullmatch(k)]}
        if len(names) > 1:
            raise AdapterError(f"{HUB_WEIGHTS_NAME} holds the adapters {sorted(names)}; save one adapter per directory")
        hidden, layers = base.hidden_size, base.num_layers

        def tensor(key: str, want: tuple[int, ...], what: str, dt=dtype) -> torch.Tensor:
            if key not in shapes:
                raise AdapterError(f"{HUB_WEIGHTS_NAME} lacks {key!r}, {what}")
            if tuple(shapes[key]) != want:
                raise AdapterError(f"tensor {key!r} in {HUB_WEIGHTS_NAME} has shape {list(shapes[key])}, expected "
                                   f"{list(want)} ({what}); the adapter was made for another base")
            return load_tensor(handle, key, dt)

        # prefix gates: one Linear(hidden, G) per layer
        g = 1 if prefix_cfg.get("shared_gating", True) else 2
        pre = f"model.layers.{{}}.self_attn.prefix_tuning.prefix_gates.{next(iter(names), name)}."
        prefix_gates = {i: (tensor(pre.format(i) + "weight", (g, hidden), "the prefix gate's weight"),
                            tensor(pre.format(i) + "bias", (g,), "the prefix gate's bias")) for i in range(layers)}
        # bottleneck gates: one Linear(hidden, 1) per adapter place
        bn_gates = {}
        for (layer, place) in bottleneck.blocks:
            hub_place = next(p for p, short in PLACES.items() if short == place)
            pre_bn = f"model.layers.{layer}.{hub_place}_adapters.adapters.{next(iter(names), name)}.gate."
            bn_gates[(layer, place)] = (tensor(pre_bn + "weight", (1, hidden), "the bottleneck gate's weight"),
                                        tensor(pre_bn + "bias", (1,), "the bottleneck gate's bias"))
        expected_gates = {pre.format(i) + p for i in range(layers) for p in ("weight", "bias")} | {
            f"model.layers.{layer}.{hp}_adapters.adapters.{next(iter(names), name)}.gate.{p}"
            for (layer, place) in bottleneck.blocks for hp, short in PLACES.items() if short == place
            for p in ("weight", "bias")}
        stray = sorted(set(gate_keys) - expected_gates)
        if stray:
            raise AdapterError(f"unexpected tensor {stray[0]!r} in {HUB_WEIGHTS_NAME}: no gated module of {CONFIG_NAME} "
                               "is there")
        # gated LoRA
        r = lora_cfg["r"]
        if r > max_rank:
            raise AdapterError(f"LoRA rank {r} (the LoRA part's r in {CONFIG_NAME}) exceeds this server's max_rank "
                               f"{max_rank}; raise --max-lora-rank")
        modules = [f"{m}_proj" for m in lora_cfg.get("attn_matrices", ["q", "v"])]
        leave_out = set(lora_cfg.get("leave_out") or [])
        lora: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
        expected_lora = set()
        for i in range(layers):
            if i in leave_out:
                continue
            for module in modules:
                fan_in, fan_out = base.module_shapes[module]
                pre_l = f"model.layers.{i}.self_attn.{module}.loras.{next(iter(names), name)}."
                expected_lora |= {pre_l + p for p in ("lora_A", "lora_B", "gate.weight", "gate.bias")}
                lora[(i, module)] = (tensor(pre_l + "lora_A", (r, fan_in), f"LoRA A of {module}, r {r}"),
                                     tensor(pre_l + "lora_B", (fan_out, r), f"LoRA B of {module}, r {r}"),
                                     tensor(pre_l + "gate.weight", (1, fan_in), f"the LoRA gate of {module}"),
                                     tensor(pre_l + "gate.bias", (1,), f"the LoRA gate's bias of {module}"))
        stray = sorted(set(lora_keys) - expected_lora)
        if stray:
            raise AdapterError(f"unexpected tensor {stray[0]!r} in {HUB_WEIGHTS_NAME}: the LoRA part of {CONFIG_NAME} "
                               "(attn_matrices, leave_out) places no LoRA there")
        if not lora or all(not a.any() or not b.any() for a, b, _, _ in lora.values()):
            raise AdapterError(f"every lora_B (or lora_A) in {HUB_WEIGHTS_NAME} is all zeros: the LoRA part is "
                               "untrained; upload the trained adapter")
        prefix = kv.to(dtype).contiguous()
        tensors = [t for v in (*prefix_gates.values(), *bn_gates.values(), *lora.values()) for t in v]
        return cls(name=name, config=config, prefix=prefix, prefix_gates=prefix_gates, bottleneck=bottleneck,
                   bottleneck_gates=bn_gates, lora=lora, num_virtual_tokens=int(prefix.shape[3]),
                   rank=max(bottleneck.rank, r),
                   target_modules=tuple(sorted(set(bottleneck.target_modules) | set(modules) | {"prefix_tuning"})),
                   nbytes=bottleneck.nbytes + prefix.nbytes + sum(t.nbytes for t in tensors))

    def write(self, layers: dict, slot: int) -> None:
        self.bottleneck.write(layers, slot)
        for (layer, place), (weight, bias) in self.bottleneck_gates.items():
            layers.bottleneck[layer].set_gate(slot, place, weight, bias)
        for key, (a, b, weight, bias) in self.lora.items():
            layers[key].set_lora(slot, a, b, 1.0)  # under gating the library applies no alpha / r
            layers[key].set_gate(slot, weight, bias)
        for layer, (weight, bias) in self.prefix_gates.items():
            layers.prefix_gate[layer].set_gate(slot, weight, bias, self.num_virtual_tokens)

    def prefix_kv(self) -> torch.Tensor | None:
        return self.prefix
