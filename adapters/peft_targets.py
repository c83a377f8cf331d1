"""The base model's linear modules as PEFT names them, and PEFT's rules for which of them an adapter targets.

Semantics reproduced from PEFT 0.21 (``peft/tuners/tuners_utils.py`` ``check_target_module_exists``,
``peft/utils/other.py`` ``get_pattern_key``):

* Module names are those of a ``*ForCausalLM`` model: ``model.layers.{i}.self_attn.q_proj``,
  ``model.layers.{i}.mlp.down_proj``, ... ``target_modules`` given as a list matches a module
  when the name equals an entry or ends with ``"." + entry``; given as a string it is a regex
  that must ``re.fullmatch`` the whole name; ``"all-linear"`` means every linear layer but
  ``lm_head``. ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` filter the
  same way PEFT does.
* ``rank_pattern`` / ``alpha_pattern``: the first key (in file order) for which
  ``re.match(rf"(.*\\.)?({key})$", module_name)`` succeeds gives that module's value.
* Tensor keys: adapter-name infixes (``.lora_A.default.weight``, ``.ia3_l.default``) and the key
  prefixes ``base_model.model.model.`` / ``base_model.model.`` / ``model.`` / none are accepted.

:data:`LINEAR_MODULES` is the one list of adapter-capable modules: the server wraps exactly these
(``server.model.adapter_layers.TARGET_MODULES``) and the trainer offers exactly these.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, AdapterError

# Linear modules of a Llama-family decoder layer -> their parent module inside the layer.
LINEAR_MODULES: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# Non-linear (or not servable) modules of a Llama-family *ForCausalLM; matching one is an error.
TOP_LEVEL_OTHER = ("model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
LAYER_OTHER = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm",
                ".self_attn.q_norm", ".self_attn.k_norm")
EMBEDDING_MODULES = ("model.embed_tokens", "lm_head")


@dataclass(frozen=True)
class BaseSpec:
    """What the loaded base model looks like, as far as adapters are concerned.

    ``module_shapes`` maps each linear module name of a decoder layer (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``) to
    ``(in_features, out_features)``; every layer has the same shapes. ``biased_modules``: the
    short names of the linears that have a bias (Qwen2: q/k/v; Llama with ``attention_bias``:
    q/k/v/o; ``mlp_bias``: gate/up/down), as the server's model builds them.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    module_shapes: dict[str, tuple[int, int]]
    biased_modules: frozenset[str] = frozenset()

    @classmethod
    def from_hf_config(cls, config: Any, name: str) -> "BaseSpec":
        """Build from a transformers ``PretrainedConfig`` (llama / mistral / qwen2 families)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        inter = int(config.intermediate_size)
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        if getattr(config, "model_type", "") == "qwen2":  # as server.model.llama.ModelArgs builds the layers
            biased = {"q_proj", "k_proj", "v_proj"}
        else:
            biased = {"q_proj", "k_proj", "v_proj", "o_proj"} if getattr(config, "attention_bias", False) else set()
            if getattr(config, "mlp_bias", False):
                biased |= {"gate_proj", "up_proj", "down_proj"}
        return cls(name=str(name or ""), num_layers=int(config.num_hidden_layers), hidden_size=hidden,
                   num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, module_shapes=shapes,
                   biased_modules=frozenset(biased))

    def module_name(self, layer: int, module: str) -> str:
        """Full PEFT module name, e.g. ``model.layers.3.self_attn.q_proj``."""
        return f"model.layers.{layer}.{LINEAR_MODULES[module]}.{module}"

    def linear_module_names(self) -> dict[str, tuple[int, str]]:
        """Full name -> (layer, module) for every adapter-capable linear layer."""
        return {self.module_name(i, m): (i, m) for i in range(self.num_layers) for m in self.module_shapes}

    def other_module_names(self) -> list[str]:
        """Names of the modules adapters must not target (embeddings, norms, containers...)."""
        names = list(TOP_LEVEL_OTHER)
        for i in range(self.num_layers):
            names += [f"model.layers.{i}{suffix}" for suffix in LAYER_OTHER]
        return names


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _excluded(config: dict, key: str) -> bool:
    exclude = config.get("exclude_modules")
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, key) is not None
    return key in exclude or any(key.endswith(f".{e}") for e in exclude)


def targeted(config: dict, key: str) -> bool:
    """``check_target_module_exists`` of PEFT for one module name (no modules_to_save: refused)."""
    if _excluded(config, key):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    found = key in targets or any(key.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        idx = _layer_index(key, config.get("layers_pattern"))
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def resolve_targets(config: dict, base: BaseSpec) -> set[tuple[int, str]]:
    """The (layer, module) pairs the config targets on ``base``; refuse impossible targets."""
    linear = base.linear_module_names()
    others = base.other_module_names()
    targets = config["target_modules"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        config = {**config, "target_modules": sorted(linear)}
        targets = config["target_modules"]
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise AdapterError(f"{CONFIG_NAME} field target_modules is not a valid regex: {exc}") from None
    else:
        for t in targets:
            if not isinstance(t, str) or not t:
                raise AdapterError(f"{CONFIG_NAME} field target_modules holds {t!r}, not a module name")
            hits = [n for n in list(linear) + others if n == t or n.endswith(f".{t}")]
            if not hits:
                raise AdapterError(f"target module {t!r} (from target_modules in {CONFIG_NAME}) does not exist in "
                                   f"the base {base.name or '(unnamed)'}; its linear modules are "
                                   f"{', '.join(base.module_shapes)}")
    for other in others:
        if targeted(config, other):
            if other in EMBEDDING_MODULES:
                raise AdapterError(f"target_modules in {CONFIG_NAME} targets {other}: adapters on the embeddings or "
                                   "lm_head are not served; retrain targeting only attention/MLP projections")
            raise AdapterError(f"target_modules in {CONFIG_NAME} targets {other or '(the whole model)'}, which is "
                               "not a linear layer; target only q/k/v/o/gate/up/down projections")
    chosen = {pair for name, pair in linear.items() if targeted(config, name)}
    if not chosen:
        raise AdapterError(f"target_modules / layers_to_transform in {CONFIG_NAME} select no module of the base")
    return chosen


def pattern_value(patterns: dict, key: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: first pattern (file order) that matches the end of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


# --------------------------------------------------------------------------------------------
KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\.(?P<parent>[A-Za-z0-9_]+)\."
    r"(?P<module>[A-Za-z0-9_]+)\.(?P<tail>.+)$")


def parse_key(key: str, param_names: tuple[str, ...], base: BaseSpec) -> tuple[int, str, str]:
    """``...layers.{i}.{parent}.{module}.{param}[.{adapter}][.weight]`` -> (layer, module, param)."""
    m = KEY_RE.match(key)
    if not m:
        raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}: not a per-layer adapter weight")
    layer, parent, module = int(m["layer"]), m["parent"], m["module"]
    parts = m["tail"].split(".")
    param, rest = parts[0], parts[1:]
    if param not in param_names:
        raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME} ({param!r} is not part of a "
                           f"{'/'.join(param_names)} adapter)")
    if param == "lora_magnitude_vector":  # DoRA: PEFT saves it with no ".weight"; accept either
        if len(rest) > 2 or (len(rest) == 2 and rest[1] != "weight"):
            raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}")
    elif param.startswith("lora_"):
        if rest and rest[-1] == "bias":
            if param != "lora_B" or "lora_B.bias" not in param_names or len(rest) > 2:
                raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is a LoRA bias, but {CONFIG_NAME} does not set "
                                   "lora_bias=true; the config and weights disagree")
            param = "lora_B.bias"
        elif not (rest == ["weight"] or (len(rest) == 2 and rest[1] == "weight")):
            raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}")
    elif len(rest) > 1:
        raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}")
    check_module(key, layer, parent, module, base)
    return layer, module, param


def check_module(key: str, layer: int, parent: str, module: str, base: BaseSpec) -> None:
    """Refuse a tensor whose (layer, parent, module) is not a decoder linear of ``base``."""
    if LINEAR_MODULES.get(module) != parent or module not in base.module_shapes or layer >= base.num_layers:
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is for module layers.{layer}.{parent}.{module}, which "
                           f"the base {base.name or '(unnamed)'} ({base.num_layers} layers) does not have")


BIAS_RE = re.compile(r"^(?:base_model\.model\.)?(?P<name>.*?)(?:\.base_layer)?\.bias$")
LAYER_MODULE_RE = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.(?P<parent>[A-Za-z0-9_]+)\.(?P<module>[A-Za-z0-9_]+)$")


def parse_base_bias_key(key: str, base: BaseSpec) -> tuple[int, str] | None:
    """A trained *base* bias as PEFT saves it with ``bias="all"`` / ``"lora_only"``:
    ``...layers.{i}.{parent}.{module}.bias`` (untargeted module) or ``...{module}.base_layer.bias``
    (LoRA-targeted module) -> (layer, module); None if ``key`` is no bias. Refuses biases outside the
    decoder linears (norms, embeddings, lm_head) and biases of linears the base has without one."""
    m = BIAS_RE.match(key)
    if not m or ".lora_" in key:
        return None
    lm = LAYER_MODULE_RE.match(m["name"])
    if not lm:
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is a trained bias of {m['name']}, which is not a decoder "
                           "linear (q/k/v/o/gate/up/down projection); only those biases are served")
    layer, parent, module = int(lm["layer"]), lm["parent"], lm["module"]
    check_module(key, layer, parent, module, base)
    if module not in base.biased_modules:
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is a trained bias of {base.module_name(layer, module)}, "
                           f"which has no bias in the base {base.name or '(unnamed)'}; PEFT would ignore it: retrain "
                           "on this base, or drop the tensor")
    return layer, module
