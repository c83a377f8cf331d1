"""Read and validate PEFT adapter directories (LoRA, IA3, prefix tuning). Never unpickles.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` exactly
as PEFT's ``save_pretrained`` writes them. This module turns such a directory into an
:class:`Adapter` whose tensors have the shapes the engine needs, after checking that the
adapter can be served *exactly* on the loaded base (described by a :class:`BaseSpec`).
Anything that cannot be served exactly, or that would silently do nothing, is refused with an
:class:`AdapterError` whose message names the offending field, tensor or file and says what to
do about it.

Semantics reproduced from PEFT 0.21 (see ``peft/tuners/tuners_utils.py``
``check_target_module_exists``, ``peft/utils/other.py`` ``get_pattern_key`` and
``_prepare_prompt_learning_config``, ``peft/peft_model.py`` ``get_prompt``):

* Module names are those of a ``*ForCausalLM`` model: ``model.layers.{i}.self_attn.q_proj``,
  ``model.layers.{i}.mlp.down_proj``, ... ``target_modules`` given as a list matches a module
  when the name equals an entry or ends with ``"." + entry``; given as a string it is a regex
  that must ``re.fullmatch`` the whole name; ``"all-linear"`` means every linear layer but
  ``lm_head``. ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` filter the
  same way PEFT does.
* ``rank_pattern`` / ``alpha_pattern``: the first key (in file order) for which
  ``re.match(rf"(.*\\.)?({key})$", module_name)`` succeeds gives that module's rank / alpha.
  LoRA scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
* IA3: a module is feed-forward when ``feedforward_modules`` (list) has an entry the module name
  ends with (plain ``str.endswith``, as PEFT), or (string) the regex full-matches it.
  Feed-forward modules scale their *input*: ``y = W (x * l)``, ``l`` of shape ``[in]``
  (stored ``[1, in]``); the others scale their *output*: ``y = (W x) * l``, ``l`` of shape
  ``[out]`` (stored ``[out, 1]``).
* Prefix tuning on a GQA model: PEFT sets ``token_dim = num_key_value_heads * head_dim`` and
  ``num_attention_heads = num_key_value_heads``; ``prompt_embeddings`` is
  ``[num_virtual_tokens, num_layers * 2 * token_dim]`` whose last dimension is laid out as
  ``(layer, k_or_v, kv_head, head_dim)`` with K before V. See :attr:`Adapter.prefix`.
  ``prefix_projection: true`` adapters are served too: PEFT saves the *projected* KV (the MLP's
  output, same shape) as ``prompt_embeddings`` and, loaded for inference, serves exactly that
  tensor without the MLP (``get_prompt`` with ``inference_mode``); the tests check equality.
* Adapter-name infixes (``.lora_A.default.weight``, ``.ia3_l.default``) and the key prefixes
  ``base_model.model.model.`` / ``base_model.model.`` / ``model.`` / none are accepted.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

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
_TOP_LEVEL_OTHER = ("model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
_LAYER_OTHER = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm",
                ".self_attn.q_norm", ".self_attn.k_norm")
_EMBEDDING_MODULES = ("model.embed_tokens", "lm_head")

_CONVERT_HINT = (
    "convert it to safetensors: load the adapter with PEFT and call "
    "`model.save_pretrained(dir, safe_serialization=True)`, or run "
    "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')` "
    "on a machine where you trust the file"
)

_SUPPORTED_TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")
_PROMPT_LEARNING_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT",
                          "CARTRIDGE")

# Config fields that carry no serving semantics (metadata, training-only knobs).
_HARMLESS_FIELDS = {
    "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "peft_version", "lora_dropout", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "init_ia3_weights", "init_weights", "eva_config", "r", "lora_alpha", "target_modules",
    "exclude_modules", "rank_pattern", "alpha_pattern", "use_rslora", "layers_to_transform",
    "layers_pattern", "init_lora_weights", "feedforward_modules", "num_virtual_tokens",
    "num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules",
    "encoder_hidden_size", "prefix_projection", "bias", "fan_in_fan_out",
}
# Fields that must hold their default (falsy) value: each changes the math or needs a modified base.
_REFUSED_IF_SET = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not served; retrain with use_dora=false",
    "lora_bias": "LoRA bias terms are not served; retrain with lora_bias=false",
    "layer_replication": "layer replication changes the base architecture",
    "megatron_config": "Megatron-parallel LoRA layers are not served",
    "use_qalora": "QA-LoRA is not served",
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not served",
    "trainable_token_indices": "trainable token embeddings are not served",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not served",
    "arrow_config": "Arrow routing is not served",
    "use_bdlora": "block-diagonal LoRA is not served",
    "velora_config": "the VeLoRA variant is not served",
    "monteclora_config": "the MonteCLoRA variant is not served",
    "kasa_config": "the KaSA variant is not served",
    "corda_config": "CorDA initialisation modifies the base weights",
    "lora_ga_config": "LoRA-GA initialisation modifies the base weights",
    "loftq_config": "LoftQ initialisation modifies the base weights",
    "modules_to_save": "fully trained extra modules (modules_to_save) are not served; retrain without them",
}
# init_lora_weights values after which the adapter only matches a *modified* base (or is a variant).
_REFUSED_LORA_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


class AdapterError(ValueError):
    """An adapter directory that cannot be served. The message names the field/file and the fix."""

    http_status = 400


@dataclass(frozen=True)
class BaseSpec:
    """What the loaded base model looks like, as far as adapters are concerned.

    ``module_shapes`` maps each linear module name of a decoder layer (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``) to
    ``(in_features, out_features)``; every layer has the same shapes.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    module_shapes: dict[str, tuple[int, int]]

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
        return cls(name=str(name or ""), num_layers=int(config.num_hidden_layers), hidden_size=hidden,
                   num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, module_shapes=shapes)

    def module_name(self, layer: int, module: str) -> str:
        """Full PEFT module name, e.g. ``model.layers.3.self_attn.q_proj``."""
        return f"model.layers.{layer}.{LINEAR_MODULES[module]}.{module}"

    def linear_module_names(self) -> dict[str, tuple[int, str]]:
        """Full name -> (layer, module) for every adapter-capable linear layer."""
        return {self.module_name(i, m): (i, m) for i in range(self.num_layers) for m in self.module_shapes}

    def other_module_names(self) -> list[str]:
        """Names of the modules adapters must not target (embeddings, norms, containers...)."""
        names = list(_TOP_LEVEL_OTHER)
        for i in range(self.num_layers):
            names += [f"model.layers.{i}{suffix}" for suffix in _LAYER_OTHER]
        return names


@dataclass
class LoraWeights:
    """LoRA factors of one (layer, module): ``delta_y = scaling * (x @ a.T) @ b.T``.

    ``a``: ``[r, in_features]``, ``b``: ``[out_features, r]``; ``scaling`` is ``alpha / r``
    (or ``alpha / sqrt(r)`` with rsLoRA), per module after ``rank_pattern`` / ``alpha_pattern``.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class Adapter:
    """A validated adapter, tensors on CPU in the requested dtype.

    * ``lora``: ``(layer, module) -> LoraWeights`` (empty unless ``kind == "lora"``).
    * ``ia3``: ``(layer, module) -> l``, 1-D: ``[out_features]`` for output-scaling modules
      (``y = (W x) * l``), ``[in_features]`` for modules in ``ia3_feedforward``
      (``y = W (x * l)``) -- exactly PEFT's semantics.
    * ``prefix``: ``[num_layers, 2, num_kv_heads, num_virtual_tokens, head_dim]`` or None.
      ``prefix[i, 0]`` is the K and ``prefix[i, 1]`` the V that PEFT puts into layer ``i``'s
      KV cache before the prompt (``get_prompt(...).layers[i].keys[0]`` / ``.values[0]``, each
      ``[kv_heads, num_virtual_tokens, head_dim]``). They are raw cache entries: PEFT applies no
      rotary embedding to them. ``prefix[:, 0]`` / ``prefix[:, 1]`` are ``[layers, Hkv, P, D]``,
      the layout ``KVCache.write_prefix`` takes.
    """

    name: str
    kind: Literal["lora", "ia3", "prefix"]
    config: dict
    lora: dict[tuple[int, str], LoraWeights] = field(default_factory=dict)
    ia3: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    ia3_feedforward: frozenset[str] = frozenset()
    prefix: torch.Tensor | None = None
    num_virtual_tokens: int = 0
    rank: int = 0
    target_modules: tuple[str, ...] = ()
    nbytes: int = 0


# --------------------------------------------------------------------------------------------
# files and config


def _check_files(path: Path) -> tuple[Path, Path]:
    """Return (config, weights) paths; refuse missing files and pickle weights."""
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist or is not a directory")
    config = path / CONFIG_NAME
    weights = path / WEIGHTS_NAME
    pickled = sorted(p.name for p in path.iterdir()
                     if p.is_file() and p.name.startswith("adapter_model") and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise AdapterError(
            f"{pickled[0]} in {path} is a pickle file, which this server never loads (pickle can run code); "
            f"{_CONVERT_HINT}, and upload only adapter_config.json + {WEIGHTS_NAME}")
    if not config.is_file():
        raise AdapterError(f"{CONFIG_NAME} is missing from {path}; save the adapter with PEFT's save_pretrained")
    if not weights.is_file():
        others = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" (found pickle file {others[0]}: {_CONVERT_HINT})" if others else ""
        raise AdapterError(f"{WEIGHTS_NAME} is missing from {path}{hint}")
    return config, weights


def read_config(path: Path) -> dict:
    """Parse ``adapter_config.json``; refuse non-JSON or non-object content."""
    try:
        config = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{CONFIG_NAME} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
    return config


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", [], {}, 0)


def _kind_of(config: dict) -> str:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterError(f"peft_type is missing from {CONFIG_NAME}; this is not a PEFT adapter")
    peft_type = peft_type.upper()
    if peft_type == "LORA":
        return "lora"
    if peft_type == "IA3":
        return "ia3"
    if peft_type == "PREFIX_TUNING":
        return "prefix"
    if peft_type in _PROMPT_LEARNING_TYPES:
        raise AdapterError(
            f"peft_type {peft_type} is not served: of the prompt-learning methods only PREFIX_TUNING is "
            "(its virtual tokens become KV-cache entries); retrain with PrefixTuningConfig")
    raise AdapterError(f"peft_type {peft_type} is not served; supported are LORA, IA3 and PREFIX_TUNING")


def _check_config(config: dict) -> str:
    """Base-independent checks of adapter_config.json. Returns the kind."""
    kind = _kind_of(config)
    task = config.get("task_type")
    if task not in _SUPPORTED_TASK_TYPES:
        raise AdapterError(f"task_type {task!r} is not served: only causal-LM adapters are "
                           "(task_type CAUSAL_LM or null)")
    for key, why in _REFUSED_IF_SET.items():
        if _is_set(config.get(key)):
            raise AdapterError(f"{CONFIG_NAME} sets {key}={config[key]!r}: {why}")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{CONFIG_NAME} sets fan_in_fan_out=true (Conv1D-style weights, GPT-2 family); "
                           "only nn.Linear bases of the Llama family are served")
    unknown = sorted(k for k in config if k not in _HARMLESS_FIELDS and k not in _REFUSED_IF_SET
                     and _is_set(config[k]))
    if unknown:
        raise AdapterError(f"{CONFIG_NAME} sets {unknown[0]}={config[unknown[0]]!r}, an option this server does "
                           "not know and so cannot serve exactly; retrain without it")
    if kind == "lora":
        bias = config.get("bias", "none")
        if bias not in (None, "none"):
            raise AdapterError(f"{CONFIG_NAME} sets bias={bias!r}: trained bias terms are not served; "
                               "retrain with bias='none'")
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
    if kind in ("lora", "ia3"):
        if not config.get("target_modules"):
            raise AdapterError(f"{CONFIG_NAME} has no target_modules")
        if not isinstance(config["target_modules"], (str, list)):
            raise AdapterError(f"{CONFIG_NAME} field target_modules must be a list of names or a regex string")
    if kind == "ia3":
        ff = config.get("feedforward_modules") or []
        targets = config["target_modules"]
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise AdapterError(f"{CONFIG_NAME}: feedforward_modules {sorted(set(ff) - set(targets))} are not in "
                               "target_modules; feedforward_modules must be a subset of target_modules")
    if kind == "prefix":
        n = config.get("num_virtual_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise AdapterError(f"{CONFIG_NAME} field num_virtual_tokens must be a positive integer, got {n!r}")
        if config.get("num_transformer_submodules", 1) not in (None, 1):
            raise AdapterError(f"{CONFIG_NAME} sets num_transformer_submodules="
                               f"{config['num_transformer_submodules']}: encoder-decoder prefixes are not served")
    return kind


def _check_base_name(config: dict, base: BaseSpec) -> None:
    wanted = config.get("base_model_name_or_path")
    if not wanted or not base.name:
        return
    a = str(wanted).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    b = str(base.name).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    if a and b and a != b:
        raise AdapterError(f"{CONFIG_NAME} field base_model_name_or_path is {wanted!r} but the loaded base is "
                           f"{base.name!r}; an adapter only works on the base it was trained on")


# --------------------------------------------------------------------------------------------
# target resolution (PEFT semantics)


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


def _targeted(config: dict, key: str) -> bool:
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


def _resolve_targets(config: dict, base: BaseSpec) -> set[tuple[int, str]]:
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
        if _targeted(config, other):
            if other in _EMBEDDING_MODULES:
                raise AdapterError(f"target_modules in {CONFIG_NAME} targets {other}: adapters on the embeddings or "
                                   "lm_head are not served; retrain targeting only attention/MLP projections")
            raise AdapterError(f"target_modules in {CONFIG_NAME} targets {other or '(the whole model)'}, which is "
                               "not a linear layer; target only q/k/v/o/gate/up/down projections")
    chosen = {pair for name, pair in linear.items() if _targeted(config, name)}
    if not chosen:
        raise AdapterError(f"target_modules / layers_to_transform in {CONFIG_NAME} select no module of the base")
    return chosen


def _pattern_value(patterns: dict, key: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: first pattern (file order) that matches the end of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


# --------------------------------------------------------------------------------------------
# tensors

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\.(?P<parent>[A-Za-z0-9_]+)\."
    r"(?P<module>[A-Za-z0-9_]+)\.(?P<tail>.+)$")


def _parse_key(key: str, param_names: tuple[str, ...], base: BaseSpec) -> tuple[int, str, str]:
    """``...layers.{i}.{parent}.{module}.{param}[.{adapter}][.weight]`` -> (layer, module, param)."""
    m = _KEY_RE.match(key)
    if not m:
        raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}: not a per-layer adapter weight")
    layer, parent, module = int(m["layer"]), m["parent"], m["module"]
    parts = m["tail"].split(".")
    param, rest = parts[0], parts[1:]
    if param not in param_names:
        raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME} ({param!r} is not part of a "
                           f"{'/'.join(param_names)} adapter)")
    if param.startswith("lora_"):
        if rest and rest[-1] == "bias":
            raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is a LoRA bias, which is not served")
        if not (rest == ["weight"] or (len(rest) == 2 and rest[1] == "weight")):
            raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}")
    elif len(rest) > 1:
        raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}")
    if LINEAR_MODULES.get(module) != parent or module not in base.module_shapes or layer >= base.num_layers:
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is for module layers.{layer}.{parent}.{module}, which "
                           f"the base {base.name or '(unnamed)'} ({base.num_layers} layers) does not have")
    return layer, module, param


def _open_weights(weights: Path) -> tuple[dict[str, tuple[int, ...]], Any]:
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{WEIGHTS_NAME} is not a valid safetensors file: {exc}") from None
    if not shapes:
        raise AdapterError(f"{WEIGHTS_NAME} holds no tensors")
    return shapes, handle


def _tensor(handle: Any, key: str, dtype: torch.dtype) -> torch.Tensor:
    t = handle.get_tensor(key)
    if not t.is_floating_point():
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} has dtype {t.dtype}; adapter weights must be floating point")
    t = t.to(dtype)
    if not torch.isfinite(t).all():
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} holds NaN or Inf values")
    return t.contiguous()


def _load_lora(config: dict, base: BaseSpec, shapes: dict, handle: Any, max_rank: int,
               dtype: torch.dtype) -> dict[tuple[int, str], LoraWeights]:
    targets = _resolve_targets(config, base)
    keys: dict[tuple[int, str, str], str] = {}
    for key in shapes:
        layer, module, param = _parse_key(key, ("lora_A", "lora_B"), base)
        if (layer, module) not in targets:
            raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} is for a module that target_modules in "
                               f"{CONFIG_NAME} does not select; the config and weights disagree")
        if (layer, module, param) in keys:
            raise AdapterError(f"{WEIGHTS_NAME} holds two {param} tensors for layers.{layer}.{module} "
                               f"({keys[(layer, module, param)]!r} and {key!r}); save one adapter per directory")
        keys[(layer, module, param)] = key
    r_default, alpha_default = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    out: dict[tuple[int, str], LoraWeights] = {}
    for layer, module in sorted(targets):
        full = base.module_name(layer, module)
        for param in ("lora_A", "lora_B"):
            if (layer, module, param) not in keys:
                raise AdapterError(f"{WEIGHTS_NAME} lacks {param} for {full}, which target_modules selects")
        r = int(_pattern_value(rank_pattern, full, r_default))
        alpha = float(_pattern_value(alpha_pattern, full, alpha_default))
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
        out[(layer, module)] = LoraWeights(a=_tensor(handle, ka, dtype), b=_tensor(handle, kb, dtype),
                                           scaling=scaling)
    if all(not w.b.any() or not w.a.any() for w in out.values()):
        raise AdapterError(f"every lora_B (or lora_A) in {WEIGHTS_NAME} is all zeros: this adapter is untrained "
                           "and would change nothing; upload the trained adapter")
    return out


def _ia3_is_feedforward(config: dict, key: str) -> bool:
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)


def _load_ia3(config: dict, base: BaseSpec, shapes: dict, handle: Any,
              dtype: torch.dtype) -> tuple[dict[tuple[int, str], torch.Tensor], frozenset[str]]:
    targets = _resolve_targets(config, base)
    keys: dict[tuple[int, str], str] = {}
    for key in shapes:
        layer, module, _ = _parse_key(key, ("ia3_l",), base)
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
        is_ff = _ia3_is_feedforward(config, full)
        if ff_by_module.setdefault(module, is_ff) != is_ff:
            raise AdapterError(f"feedforward_modules in {CONFIG_NAME} makes {module} feed-forward in some layers "
                               "and not in others, which is not served")
        fan_in, fan_out = base.module_shapes[module]
        want = (1, fan_in) if is_ff else (fan_out, 1)
        key = keys[(layer, module)]
        if shapes[key] != want:
            raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} has shape {list(shapes[key])}, expected {list(want)} "
                               f"({'feed-forward: scales the input' if is_ff else 'scales the output'}, per "
                               f"feedforward_modules in {CONFIG_NAME}); the adapter does not fit this base")
        out[(layer, module)] = _tensor(handle, key, dtype).flatten()
    if all(bool((v == 1).all()) for v in out.values()):
        raise AdapterError(f"every ia3_l vector in {WEIGHTS_NAME} is all ones: this adapter is untrained and would "
                           "change nothing; upload the trained adapter")
    return out, frozenset(m for m, ff in ff_by_module.items() if ff)


def _load_prefix(config: dict, base: BaseSpec, shapes: dict, handle: Any, dtype: torch.dtype) -> torch.Tensor:
    n = config["num_virtual_tokens"]
    token_dim = base.num_kv_heads * base.head_dim  # PEFT's GQA rule (#1901)
    expected = {"num_layers": base.num_layers, "num_attention_heads": base.num_kv_heads, "token_dim": token_dim}
    for key, want in expected.items():
        got = config.get(key)
        if got is not None and got != want:
            raise AdapterError(
                f"{CONFIG_NAME} field {key} is {got} but this base needs {want} (layers={base.num_layers}, "
                f"kv_heads={base.num_kv_heads}, head_dim={base.head_dim}); the prefix was made for another base "
                "(or by a PEFT older than 0.12, before grouped-query attention support)")
    unexpected = sorted(k for k in shapes if k not in ("prompt_embeddings", "prompt_embeddings.default"))
    if unexpected or len(shapes) != 1:
        raise AdapterError(f"unexpected tensor {(unexpected or sorted(shapes))[0]!r} in {WEIGHTS_NAME}: a "
                           "prefix-tuning adapter holds exactly one tensor, prompt_embeddings")
    key = next(iter(shapes))
    want = (n, base.num_layers * 2 * token_dim)
    if shapes[key] != want:
        raise AdapterError(f"tensor {key!r} in {WEIGHTS_NAME} has shape {list(shapes[key])}, expected {list(want)} "
                           f"= [num_virtual_tokens, layers * 2 * kv_heads * head_dim]; the prefix does not fit this "
                           "base")
    emb = _tensor(handle, key, dtype)
    # [P, L*2*Hkv*D] -> [P, 2L, Hkv, D] (PEFT's view) -> [2L, Hkv, P, D] (PEFT's permute, batch dropped)
    # -> [L, 2, Hkv, P, D]: PEFT splits 2L into per-layer pairs, K first.
    kv = emb.view(n, base.num_layers * 2, base.num_kv_heads, base.head_dim).permute(1, 2, 0, 3)
    return kv.reshape(base.num_layers, 2, base.num_kv_heads, n, base.head_dim).contiguous()


# --------------------------------------------------------------------------------------------
# public API


def inspect_adapter_dir(path: str | Path) -> dict:
    """Cheap metadata of an adapter directory, without a base; base-independent checks only.

    Reads the config and the safetensors header (no tensor data). Returns ``{"kind",
    "peft_type", "rank", "target_modules", "base_model", "num_virtual_tokens"}`` where
    ``rank`` is the largest LoRA rank in the weights (0 for other kinds) and ``target_modules``
    the sorted short names of the modules that carry weights (empty for prefix).
    """
    path = Path(path)
    _, weights = _check_files(path)
    config = read_config(path)
    kind = _check_config(config)
    shapes, _ = _open_weights(weights)
    rank, modules = 0, set()
    if kind in ("lora", "ia3"):
        for key, shape in shapes.items():
            m = _KEY_RE.match(key)
            if not m:
                raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_NAME}: not a per-layer adapter weight")
            modules.add(m["module"])
            if kind == "lora" and m["tail"].split(".")[0] == "lora_A" and len(shape) == 2:
                rank = max(rank, shape[0])
    return {
        "kind": kind,
        "peft_type": str(config["peft_type"]).upper(),
        "rank": int(rank),
        "target_modules": sorted(modules),
        "base_model": config.get("base_model_name_or_path") or None,
        "num_virtual_tokens": int(config.get("num_virtual_tokens") or 0) if kind == "prefix" else 0,
    }


def load_adapter(path: str | Path, base: BaseSpec, *, max_rank: int, name: str | None = None,
                 dtype: torch.dtype = torch.float32) -> Adapter:
    """Read, validate against ``base`` and return the adapter at ``path`` (tensors on CPU in ``dtype``).

    Raises :class:`AdapterError` for anything that cannot be served exactly (see module doc).
    """
    path = Path(path)
    _, weights = _check_files(path)
    config = read_config(path)
    kind = _check_config(config)
    _check_base_name(config, base)
    shapes, handle = _open_weights(weights)
    adapter = Adapter(name=name or path.name, kind=kind, config=config)  # type: ignore[arg-type]
    if kind == "lora":
        adapter.lora = _load_lora(config, base, shapes, handle, max_rank, dtype)
        adapter.rank = max(w.rank for w in adapter.lora.values())
        adapter.target_modules = tuple(sorted({m for _, m in adapter.lora}))
        adapter.nbytes = sum(w.a.nbytes + w.b.nbytes for w in adapter.lora.values())
    elif kind == "ia3":
        adapter.ia3, adapter.ia3_feedforward = _load_ia3(config, base, shapes, handle, dtype)
        adapter.target_modules = tuple(sorted({m for _, m in adapter.ia3}))
        adapter.nbytes = sum(v.nbytes for v in adapter.ia3.values())
    else:
        adapter.prefix = _load_prefix(config, base, shapes, handle, dtype)
        adapter.num_virtual_tokens = int(config["num_virtual_tokens"])
        adapter.nbytes = adapter.prefix.nbytes
    log.debug("loaded %s adapter %s (%d bytes)", kind, adapter.name, adapter.nbytes)
    return adapter
