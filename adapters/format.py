"""Read and validate PEFT (and AdapterHub bottleneck) adapter directories. Never unpickles.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as
PEFT's ``save_pretrained`` writes them (:mod:`adapters.peft_files`). :func:`load_adapter` turns one
into an :class:`~adapters.kinds.base.Adapter` of its kind (:mod:`adapters.kinds`: LoRA, DoRA, IA3,
prefix tuning, prompt tuning / P-tuning), whose tensors have the shapes the engine needs, after checking that the adapter
can be served *exactly* on the loaded base (a :class:`BaseSpec`). Anything that cannot be served
exactly, or that would silently do nothing, is refused with an :class:`AdapterError` whose message
names the offending field, tensor or file and says what to do about it.

This module holds what every kind shares: picking the kind from ``peft_type`` (and ``use_dora``),
the task type, config fields that are refused whatever the kind, and unknown fields (refused too:
an option we do not know might change the math). Which modules a config targets follows PEFT
exactly (:mod:`adapters.peft_targets`); each kind's semantics are in its own module.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from adapters.kinds import (KINDS, Adapter, BottleneckAdapter, DoraAdapter, Ia3Adapter, LoraAdapter, LoraWeights, PrefixAdapter,
                            PromptAdapter)
from adapters.kinds.mam import MamAdapter
from adapters.kinds.unipelt import UnipeltAdapter
from adapters.peft_files import (CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, AdapterError, check_base_name,
                                 check_files, is_set, open_weights, read_config)
from adapters.peft_targets import LINEAR_MODULES, BaseSpec

log = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_SUFFIXES", "LINEAR_MODULES", "Adapter", "AdapterError", "BaseSpec",
           "DoraAdapter", "Ia3Adapter", "LoraAdapter", "LoraWeights", "PrefixAdapter", "PromptAdapter", "inspect_adapter_dir",
           "kind_of", "load_adapter", "read_config"]

_SUPPORTED_TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")
_PROMPT_LEARNING_TYPES = ("MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT", "CARTRIDGE")
# Config fields of every kind that carry no serving semantics (metadata).
_METADATA_FIELDS = {"peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision",
                    "inference_mode", "peft_version", "init_weights"}
# Fields that must hold their default (falsy) value: each changes the math or needs a modified base.
_REFUSED_IF_SET = {
    "use_dora": "DoRA is a LoRA variant: use_dora must be true or false",
    "lora_bias": "lora_bias is a LoRA option (served for peft_type LORA only)",
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


def kind_of(config: dict) -> type[Adapter]:
    """The adapter class for a parsed ``adapter_config.json``, after every base-independent check."""
    if UnipeltAdapter.matches(config):  # an AdapterHub union with LoRA or gates (UniPELT)
        UnipeltAdapter.check_config(config)
        return UnipeltAdapter
    if MamAdapter.matches(config):  # an AdapterHub union (MAM: prefix tuning + a bottleneck adapter)
        MamAdapter.check_config(config)
        return MamAdapter
    if BottleneckAdapter.matches(config):  # AdapterHub's format: no peft_type, settings under "config"
        BottleneckAdapter.check_config(config)
        return BottleneckAdapter
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterError(f"peft_type is missing from {CONFIG_NAME}; this is not a PEFT adapter")
    peft_type = peft_type.upper()
    kind = next((k for k in KINDS if k.matches(config)), None)
    if kind is None:
        if peft_type in _PROMPT_LEARNING_TYPES:
            raise AdapterError(
                f"peft_type {peft_type} is not served: of the prompt-learning methods PREFIX_TUNING, PROMPT_TUNING "
                "and P_TUNING are; retrain with one of those")
        if peft_type == "LORA":
            raise AdapterError(f"{CONFIG_NAME} sets use_dora={config.get('use_dora')!r}: "
                               f"{_REFUSED_IF_SET['use_dora']}")
        raise AdapterError(f"peft_type {peft_type} is not served; supported are LORA (with or without use_dora), "
                           "IA3, PREFIX_TUNING, PROMPT_TUNING and P_TUNING")
    task = config.get("task_type")
    if task not in _SUPPORTED_TASK_TYPES:
        raise AdapterError(f"task_type {task!r} is not served: only causal-LM adapters are "
                           "(task_type CAUSAL_LM or null)")
    for key, why in _REFUSED_IF_SET.items():
        if key not in kind.config_fields and is_set(config.get(key)):
            raise AdapterError(f"{CONFIG_NAME} sets {key}={config[key]!r}: {why}")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{CONFIG_NAME} sets fan_in_fan_out=true (Conv1D-style weights, GPT-2 family); "
                           "only nn.Linear bases of the Llama family are served")
    known = _METADATA_FIELDS | kind.config_fields | set(_REFUSED_IF_SET)
    unknown = sorted(k for k in config if k not in known and is_set(config[k]))
    if unknown:
        raise AdapterError(f"{CONFIG_NAME} sets {unknown[0]}={config[unknown[0]]!r}, an option this server does "
                           f"not know for {kind.kind} adapters and so cannot serve exactly; retrain without it")
    kind.check_config(config)
    return kind


def inspect_adapter_dir(path: str | Path) -> dict:
    """Cheap metadata of an adapter directory, without a base; base-independent checks only.

    Reads the config and the safetensors header (no tensor data). Returns ``{"kind",
    "peft_type", "rank", "target_modules", "base_model", "num_virtual_tokens"}`` where
    ``rank`` is the largest LoRA rank in the weights (0 for kinds without one) and
    ``target_modules`` the sorted short names of the modules that carry weights (empty for
    virtual-token kinds).
    """
    path = Path(path)
    _, weights = check_files(path)
    config = read_config(path)
    kind = kind_of(config)
    shapes, _ = open_weights(weights)
    rank, modules = kind.inspect(config, shapes)
    return {
        "kind": kind.kind,
        "peft_type": str(config.get("peft_type") or "ADAPTERHUB").upper(),
        "rank": int(rank),
        "target_modules": list(modules),
        "base_model": config.get("base_model_name_or_path") or None,
        "num_virtual_tokens": kind.virtual_tokens(config),
    }


def load_adapter(path: str | Path, base: BaseSpec, *, max_rank: int, name: str | None = None,
                 dtype: torch.dtype = torch.float32) -> Adapter:
    """Read, validate against ``base`` and return the adapter at ``path`` (tensors on CPU in ``dtype``).

    Raises :class:`AdapterError` for anything that cannot be served exactly (see module doc).
    """
    path = Path(path)
    _, weights = check_files(path)
    config = read_config(path)
    kind = kind_of(config)
    check_base_name(config, base)
    shapes, handle = open_weights(weights)
    adapter = kind.load(name or path.name, config, base, shapes, handle, max_rank=max_rank, dtype=dtype)
    log.debug("loaded %s adapter %s (%d bytes)", kind.kind, adapter.name, adapter.nbytes)
    return adapter
