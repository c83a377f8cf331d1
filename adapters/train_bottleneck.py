"""Bottleneck adapters for the trainer (``adapterctl train --kind houlsby|pfeiffer|parallel``).

Our own torch modules, written to AdapterHub's formulas (``adapters`` 1.3.0; the same semantics the server
serves, :mod:`adapters.kinds.bottleneck`), saved in the library's own format, so that the file the trainer writes
is the file the library's ``load_adapter(..., use_safetensors=True)`` and the server both load. The library
itself is not needed at training time (it pins transformers 4.57, which cannot live in our venv);
tests/test_train_bottleneck.py loads the trained file into the library (its own venv) and holds its logits to
ours within 1e-4 (fp32).

With f(x) = W_up act(W_down x + b_down) + b_up, at a place with residual input r and sublayer output s
(after attention: r = the block input h, s = o_proj's output; after the MLP: r = h' = the block's residual
after attention, s = the MLP's output), the place's output is ``r + s + scaling * f(x)`` with x = s (houlsby),
s + r (pfeiffer) or r (parallel). Hooks on the Hugging Face decoder layer (Llama, Mistral, Qwen2) implement it:
a forward pre-hook on ``input_layernorm`` / ``post_attention_layernorm`` keeps r, a forward hook on ``self_attn``
/ ``mlp`` adds ``scaling * f(x)`` to s (the layer then adds r).

Defaults are the library's configs: houlsby = ``double_seq_bn`` (both places, swish, reduction 16, "bert"
init: both projections N(0, 0.02), biases 0), pfeiffer = ``seq_bn`` (after the MLP, relu, reduction 16, "bert"),
parallel = ``par_bn`` (after the MLP, relu, reduction 2, scaling 4, "mam_adapter" init: kaiming-uniform down,
zero up). The width is the library's ``int(hidden // reduction_factor)``.

Saved as ``adapter_config.json`` = ``{"config": {...the library's full BnConfig...}, "hidden_size", "model_class",
"model_name", "model_type", "name", "version"}`` and ``adapter.safetensors`` with the library's keys
``model.layers.{i}.{attention|output}_adapters.adapters.{name}.adapter_down.0.weight`` [r, H] (and ``.bias``),
``...adapter_up.weight`` [H, r] (and ``.bias``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from adapters.kinds.bottleneck import expected_width
from adapters.peft_files import CONFIG_NAME, HUB_WEIGHTS_NAME
from adapters.train_config import SERVER_MAX_RANK, TrainConfig, TrainError, log
from server.model.bottleneck_layers import ACTIVATIONS

# trainer kind (adapters.train_config.BOTTLENECK_KINDS) -> the library's config name (AdapterConfig.load)
LIBRARY_NAMES = {"houlsby": "double_seq_bn", "pfeiffer": "seq_bn", "parallel": "par_bn"}
LIBRARY_VERSION = "adapters.1.3.0"  # the library release whose format and defaults these are
# BnConfig fields as the library 1.3.0 saves them, common to the three configs (no effect on these adapters).
_COMMON = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights_seed": None,
    "inv_adapter": None, "inv_adapter_reduction_factor": None, "learn_phm": True, "leave_out": [],
    "ln_after": False, "ln_before": False, "original_ln_after": True, "phm_bias": True, "phm_c_init": "normal",
    "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False, "phm_rank": 1, "residual_before_ln": True,
    "shared_W_phm": False, "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
LIBRARY_CONFIGS = {
    "houlsby": {**_COMMON, "init_weights": "bert", "is_parallel": False, "mh_adapter": True,
                "non_linearity": "swish", "original_ln_before": False, "output_adapter": True,
                "reduction_factor": 16, "scaling": 1.0},
    "pfeiffer": {**_COMMON, "init_weights": "bert", "is_parallel": False, "mh_adapter": False,
                 "non_linearity": "relu", "original_ln_before": True, "output_adapter": True,
                 "reduction_factor": 16, "scaling": 1.0},
    "parallel": {**_COMMON, "init_weights": "mam_adapter", "is_parallel": True, "mh_adapter": False,
                 "non_linearity": "relu", "original_ln_before": False, "output_adapter": True,
                 "reduction_factor": 2, "scaling": 4.0},
}
# place -> (the library's module prefix, the sublayer whose output s gets the delta, the norm whose input is r)
PLACES = {"attention": ("attention_adapters", "self_attn", "input_layernorm"),
          "output": ("output_adapters", "mlp", "post_attention_layernorm")}


def library_config(kind: str, reduction_factor: float | None = None, activation: str | None = None) -> dict:
    """The library's full BnConfig dict for ``kind``, with the given overrides."""
    if kind not in LIBRARY_CONFIGS:
        raise TrainError(f"unknown bottleneck kind {kind!r}; choose one of {', '.join(LIBRARY_CONFIGS)}")
    config = dict(LIBRARY_CONFIGS[kind])
    if reduction_factor is not None:
        if not reduction_factor > 0:
            raise TrainError("--reduction-factor must be positive")
        config["reduction_factor"] = int(reduction_factor) if float(reduction_factor).is_integer() \
            else float(reduction_factor)
    if activation is not None:
        if activation.lower() not in ACTIVATIONS:
            raise TrainError(f"--activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        config["non_linearity"] = activation.lower()
    return config


def width(config: dict, hidden: int, layer: int = 0) -> int:
    """The library's bottleneck width at ``layer``: ``int(hidden // reduction_factor)``, at least 1 (576 // 16 =
    36); a per-layer mapping as the library reads it (the server's own rule, adapters.kinds.bottleneck)."""
    return expected_width(config, hidden, layer)


def check(config: TrainConfig, hidden: int) -> int:
    """Refuse options a bottleneck kind cannot take, before the slow part; warn about a width a default server
    refuses (as the trainer does for LoRA ranks). Returns the width."""
    if config.quantization != "none":
        raise TrainError(f"--kind {config.kind} trains over the unquantized base only (--quantization none); the "
                         "server serves the adapter over an NF4 base all the same")
    bn = library_config(config.kind, config.reduction_factor, config.activation)
    w = width(bn, hidden)
    if w > SERVER_MAX_RANK:
        log.warning("the %s width int(%d // %s) = %d is above %d, the widest bottleneck a default adapter-server "
                    "accepts: uploading this adapter is refused unless the server runs with --max-lora-rank %d or "
                    "more (or pass --reduction-factor %d or more)", config.kind, hidden, bn["reduction_factor"], w,
                    SERVER_MAX_RANK, w, -(-hidden // SERVER_MAX_RANK))
    return w


class Bottleneck(nn.Module):
    """One adapter module f(x) = W_up act(W_down x + b_down) + b_up, x [..., H] -> [..., H], with the library's
    parameter names (``adapter_down.0``, ``adapter_up``) and initialisations."""

    def __init__(self, hidden: int, rank: int, activation: str, init: str):
        super().__init__()
        self.adapter_down = nn.Sequential(nn.Linear(hidden, rank))
        self.adapter_up = nn.Linear(rank, hidden)
        self.activation = ACTIVATIONS[activation]
        with torch.no_grad():
            if init == "bert":
                for linear in (self.adapter_down[0], self.adapter_up):
                    linear.weight.normal_(0.0, 0.02)
                    linear.bias.zero_()
            elif init == "mam_adapter":
                nn.init.kaiming_uniform_(self.adapter_down[0].weight, a=5 ** 0.5)
                for t in (self.adapter_down[0].bias, self.adapter_up.weight, self.adapter_up.bias):
                    t.zero_()
            else:
                raise TrainError(f"unknown init_weights {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.activation(self.adapter_down(x)))


class BottleneckAdapters(nn.Module):
    """The adapter modules of one model, keyed ``"{i}_{place}"``, and the hooks that apply them.

    ``attach`` registers them on a Hugging Face causal LM; the modules are a child of this object only, so the
    base's own state dict is unchanged. ``state_dict_library`` gives the library's keys for ``name``.
    """

    def __init__(self, kind: str, config: dict, hidden: int, num_layers: int):
        super().__init__()
        self.kind, self.config, self.hidden = kind, config, hidden
        self.scaling = float(config["scaling"])
        sub = 1.0 if not config["is_parallel"] else 0.0
        res = 1.0 if (config["is_parallel"] or config["original_ln_before"]) else 0.0
        self.take_sub, self.take_res = sub, res  # x = take_sub * s + take_res * r
        places = [p for p, flag in (("attention", "mh_adapter"), ("output", "output_adapter")) if config[flag]]
        leave_out = set(config.get("leave_out") or [])
        self.modules_by_place = nn.ModuleDict({
            f"{i}_{p}": Bottleneck(hidden, width(config, hidden, i), config["non_linearity"],
                                   config.get("init_weights", "bert"))
            for i in range(num_layers) if i not in leave_out for p in places})
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        """Hook every decoder layer of ``model`` (``model.model.layers``) that has an adapter."""
        layers = model.get_decoder().layers
        for key, module in self.modules_by_place.items():
            i, place = key.split("_")
            _, sublayer, norm = PLACES[place]
            layer = layers[int(i)]
            saved: dict[str, torch.Tensor] = {}

            def keep_residual(_norm, args, saved=saved):
                saved["r"] = args[0]

            def add_delta(_sub, _args, output, saved=saved, module=module):
                s = output[0] if isinstance(output, tuple) else output
                x = s if self.take_res == 0 else (saved.pop("r") if self.take_sub == 0 else s + saved.pop("r"))
                out = s + self.scaling * module(x)
                return (out, *output[1:]) if isinstance(output, tuple) else out

            self._handles.append(getattr(layer, norm).register_forward_pre_hook(keep_residual))
            self._handles.append(getattr(layer, sublayer).register_forward_hook(add_delta))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_dict_library(self, name: str) -> dict[str, torch.Tensor]:
        """The library's tensors: ``model.layers.{i}.{attention|output}_adapters.adapters.{name}.{param}``."""
        out = {}
        for key, module in self.modules_by_place.items():
            i, place = key.split("_")
            prefix = f"model.layers.{i}.{PLACES[place][0]}.adapters.{name}"
            for param, tensor in module.state_dict().items():
                out[f"{prefix}.{param}"] = tensor.detach().float().contiguous().cpu()
        return out


class BottleneckModel(nn.Module):
    """A frozen Hugging Face causal LM with trainable bottleneck adapters: ``forward`` is the base's, hooked."""

    def __init__(self, base: nn.Module, adapters: BottleneckAdapters, base_name: str):
        super().__init__()
        self.base, self.adapters, self.base_name = base, adapters, base_name
        base.requires_grad_(False)
        adapters.attach(base)

    def forward(self, **kwargs):
        return self.base(**kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.adapters.parameters()).device


def build(kind: str, base_model: nn.Module, base_name: str, *, reduction_factor: float | None = None,
          activation: str | None = None, seed: int = 0) -> BottleneckModel:
    """``base_model`` with fresh adapters of ``kind`` (initialised from ``seed``, the library's init)."""
    hf = base_model.config
    config = library_config(kind, reduction_factor, activation)
    torch.manual_seed(seed)
    device = next(base_model.parameters()).device
    adapters = BottleneckAdapters(kind, config, int(hf.hidden_size), int(hf.num_hidden_layers)).to(device)
    return BottleneckModel(base_model, adapters, base_name)


def adapter_name(out: Path) -> str:
    """The adapter's name inside the file (the library keys weights by it): the output dir's name, with
    characters other than letters, digits, '-' and '_' replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(out).name) or "adapter"


def save(model: BottleneckModel, dest: Path, name: str) -> None:
    """Write ``adapter_config.json`` + ``adapter.safetensors`` in the library's format into ``dest``."""
    from safetensors.torch import save_file

    hf = model.base.config
    config = {"config": model.adapters.config, "hidden_size": int(hf.hidden_size),
              "model_class": (getattr(hf, "architectures", None) or [type(model.base).__name__])[0],
              "model_name": model.base_name, "model_type": hf.model_type, "name": name, "version": LIBRARY_VERSION}
    (dest / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(model.adapters.state_dict_library(name), str(dest / HUB_WEIGHTS_NAME))


def load(path: Path, base_model: nn.Module, base_name: str = "", dtype: torch.dtype = torch.float32
         ) -> BottleneckModel:
    """A saved bottleneck adapter (``save``'s output, or the library's own ``adapter.safetensors`` of the same
    three kinds) back on ``base_model`` as the training module computes it: a reference in tests (its logits
    against the library's and the server's)."""
    from safetensors.torch import load_file

    saved = json.loads((Path(path) / CONFIG_NAME).read_text())
    config, name = saved["config"], saved["name"]
    kind = ("parallel" if config["is_parallel"] else "pfeiffer" if config["original_ln_before"] else "houlsby")
    hf = base_model.config
    adapters = BottleneckAdapters(kind, config, int(hf.hidden_size), int(hf.num_hidden_layers))
    weights = load_file(str(Path(path) / HUB_WEIGHTS_NAME))
    mine = adapters.state_dict_library(name)
    if set(weights) != set(mine):
        raise TrainError(f"{path}: the tensors {sorted(set(weights) ^ set(mine))[:3]} do not match its config")
    with torch.no_grad():
        for key, module in adapters.modules_by_place.items():
            i, place = key.split("_")
            prefix = f"model.layers.{i}.{PLACES[place][0]}.adapters.{name}."
            for param, tensor in module.state_dict(keep_vars=True).items():
                tensor.copy_(weights[prefix + param])
    device = next(base_model.parameters()).device
    return BottleneckModel(base_model, adapters.to(device=device, dtype=dtype), base_name)
