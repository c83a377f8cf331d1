"""The trainer's model side: the base checkpoint, the PEFT wrapper, the loss and the optimizer loop."""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from adapters.dataset import IGNORE_INDEX, Example, batches, collate
from adapters.format import BaseSpec
from server.model.quant import keep_4bit_trainable
from adapters.train_config import (BOTTLENECK_KINDS, BUILTIN_BASES, DEFAULT_TARGETS, KINDS, LORA_KINDS, QUANTIZATIONS, VIRTUAL_TOKEN_KINDS,
                                   TrainConfig, TrainError, log, plan_steps)


def resolve_base(config: TrainConfig) -> Path:
    """The base checkpoint directory, named as the server names its ``--model``.

    None: the server's default model (SmolLM2-135M-Instruct, converted into the cache on first use);
    ``tiny-llama-builtin``: the built-in tiny model; a ``.gguf`` file: converted once
    into the cache; anything else: a Hugging Face checkpoint directory.
    """
    if config.base is None:
        from server.model.default_model import DefaultModelMissing, ensure_default_model

        try:
            return ensure_default_model(config.cache_dir)
        except DefaultModelMissing as exc:
            raise TrainError(f"{exc} (or pass --base PATH)") from None
    if str(config.base) in BUILTIN_BASES:
        from server.model.builtin import ensure_builtin_model

        return ensure_builtin_model(config.cache_dir)
    base = Path(config.base).expanduser()
    if base.suffix.lower() == ".gguf" and base.is_file():
        from server.model.gguf import ensure_gguf_model

        return ensure_gguf_model(base, config.cache_dir)
    if not (base / "config.json").is_file():
        raise TrainError(f"--base {base} is not a Hugging Face checkpoint directory (no config.json)")
    return base


def load_tokenizer(base: Path):
    """(tokenizer, hf_config) of the base checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(base), AutoConfig.from_pretrained(base)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise TrainError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None


def load_base_model(base: Path, hf_config, quantization: str, device: torch.device):
    """The frozen fp32 base on ``device``; ``nf4`` loads it through bitsandbytes (4-bit weights, fp32 compute)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        if device.type == "cpu":
            check_nf4_shapes(hf_config, base)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = {"": device}
    elif quantization != "none":
        raise TrainError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if quantization == "none":
        model.to(device)
    model.requires_grad_(False)
    return model


def check_nf4_shapes(hf_config, base: Path) -> None:
    """bitsandbytes' CPU NF4 path fails at the first forward unless every in_features is a multiple of 64."""
    spec = BaseSpec.from_hf_config(hf_config, base.name)
    bad = sorted({m for m, (fan_in, _) in spec.module_shapes.items() if fan_in % 64})
    if bad:
        raise TrainError(f"--quantization nf4 on CPU needs every linear layer's input size to be a multiple of 64 "
                         f"(bitsandbytes' block size); {', '.join(bad)} of {base} are not: use --quantization none")


def peft_config(config: TrainConfig, spec: BaseSpec):
    """The PEFT config for ``config.kind``, restricted to what the server serves exactly."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if config.kind not in KINDS:
        raise TrainError(f"unknown kind {config.kind!r}; choose one of {', '.join(KINDS)}")
    if config.lora_bias and config.kind != "lora":
        raise TrainError(f"--lora-bias is for --kind lora only (PEFT does not support it with DoRA)"
                         if config.kind == "dora" else f"--lora-bias is for --kind lora, not {config.kind}")
    if config.kind in VIRTUAL_TOKEN_KINDS:
        if config.virtual_tokens <= 0:
            raise TrainError("--virtual-tokens must be positive")
        if config.kind == "prefix":
            return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens,
                                      prefix_projection=False)
        if config.kind == "prompt":  # RANDOM in the config; init_prompt() sets the answers' embeddings
            return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens)
        extra = {} if config.encoder_hidden_size is None else {"encoder_hidden_size": config.encoder_hidden_size}
        if config.encoder_hidden_size is not None and config.encoder_hidden_size <= 0:
            raise TrainError("--encoder-hidden-size must be positive")
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens, **extra)
    targets = tuple(config.targets or DEFAULT_TARGETS[config.kind])
    unknown = sorted(set(targets) - set(spec.module_shapes))
    if unknown or not targets:
        raise TrainError(f"--targets {','.join(unknown) or '(none)'}: choose among {', '.join(spec.module_shapes)}")
    if config.kind in LORA_KINDS:
        if config.rank <= 0:
            raise TrainError("--rank must be positive")
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.rank, lora_alpha=config.alpha or 2 * config.rank,
                          lora_dropout=config.dropout, target_modules=list(targets), bias="none",
                          use_dora=config.kind == "dora", lora_bias=config.lora_bias)
    if config.kind == "ia3":
        ff = config.feedforward
        if ff is None:
            ff = tuple(t for t in targets if t == "down_proj")  # PEFT's default for Llama
        if not set(ff) <= set(targets):
            raise TrainError(f"--feedforward {','.join(ff)} must be a subset of --targets {','.join(targets)}")
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(targets), feedforward_modules=list(ff))
    raise TrainError(f"unknown kind {config.kind!r}; choose one of {', '.join(KINDS)}")


def build_model(config: TrainConfig, base_model, spec: BaseSpec, base_name: str):
    """Wrap ``base_model`` with a fresh PEFT adapter (initialised from ``config.seed``); bottleneck kinds with our
    own modules (:mod:`adapters.train_bottleneck`)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if config.kind in BOTTLENECK_KINDS:
        return build_bottleneck(config, base_model, base_name)
    if config.reduction_factor is not None or config.activation is not None:
        raise TrainError(f"--reduction-factor and --activation are for the bottleneck kinds "
                         f"({', '.join(BOTTLENECK_KINDS)}), not {config.kind}")
    if config.quantization == "nf4":
        # Casts the remaining fp16/bf16 parameters to fp32; no gradient checkpointing (only slower here).
        base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
        keep_4bit_trainable(base_model)  # eval passes must not repack the weights into bnb's inference-only layout
    torch.manual_seed(config.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # lora_bias on a linear without a base bias: PEFT cannot merge it, the server serves and folds it anyway
        warnings.filterwarnings("ignore", message=".*lora_bias=True. was passed but the targeted layer.*")
        model = get_peft_model(base_model, peft_config(config, spec))
    model.peft_config["default"].base_model_name_or_path = base_name
    return model


def build_bottleneck(config: TrainConfig, base_model, base_name: str):
    """``base_model`` with fresh AdapterHub-style bottleneck adapters (:mod:`adapters.train_bottleneck`)."""
    from adapters.train_bottleneck import build

    return build(config.kind, base_model, base_name, reduction_factor=config.reduction_factor,
                 activation=config.activation, seed=config.seed)


@torch.no_grad()
def init_prefix(model, train: Sequence[Example]) -> None:
    """Start a prefix as the base's own keys and values of the training answers, read as text.

    PEFT initialises ``prompt_embeddings`` from N(0, 1), far from any real key or value: on the
    default model the first loss was 9.9 against the base's 4.2 (demo task), and the prefix spent its
    steps undoing that. Keys and values of real tokens start where the base is (the prefix then
    means "the model has just read these answers") and learn the task from there.
    """
    cfg = model.peft_config["default"]
    n = cfg.num_virtual_tokens
    ids = [t for e in train for t in e.completion_ids] or [0]
    ids = (ids * (n // len(ids) + 1))[:n]
    cache = model.get_base_model()(input_ids=torch.tensor([ids], device=model.device), use_cache=True).past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    if len(layers) != cfg.num_layers:
        raise TrainError(f"the base returned keys and values for {len(layers)} layers, the prefix has {cfg.num_layers}")
    # PEFT's layout: [virtual tokens, layers * 2 (key, value), kv heads, head dim], flattened.
    kv = torch.stack([t[0].transpose(0, 1) for pair in layers for t in pair], dim=1)
    weight = model.prompt_encoder["default"].embedding.weight
    weight.copy_(kv.reshape(weight.shape).to(weight.dtype))


@torch.no_grad()
def init_prompt(model, train: Sequence[Example]) -> None:
    """Start prompt-tuning embeddings as the base's word embeddings of the training answers' tokens (PEFT's
    TEXT init, with the answers as the text, without a tokenizer path in the saved config)."""
    n = model.peft_config["default"].num_virtual_tokens
    ids = [t for e in train for t in e.completion_ids] or [0]
    ids = (ids * (n // len(ids) + 1))[:n]
    words = model.get_base_model().get_input_embeddings().weight
    weight = model.prompt_encoder["default"].embedding.weight
    weight.copy_(words[torch.tensor(ids, device=words.device)].to(weight.dtype))


# ------------------------------------------------------------------------------------------ training


def token_loss_sums(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, their number) for one batch.

    Logits are computed only from the first labelled position of the batch on (``logits_to_keep``):
    prompts are ~80% of a demo chat row's tokens, and the default model's 49152-word output layer
    is ~20% of a step's FLOPs when applied to every position (the loss is the same either way).
    """
    device = next(model.parameters()).device
    labels = batch["labels"]
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    start = max(0, int(labelled[0]) - 1) if len(labelled) else 0
    width = labels.shape[1]
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False, logits_to_keep=width - start)
    logits = out.logits[:, -(width - start):-1].float()
    targets = labels[:, start + 1:].to(device)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(model, examples: Sequence[Example], batch_size: int, pad_id: int) -> float | None:
    """Mean cross-entropy per completion token over ``examples`` (None when there are none)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches(examples, batch_size, None):
        loss, n = token_loss_sums(model, collate(batch, pad_id))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def fit(model, train: Sequence[Example], config: TrainConfig, pad_id: int) -> list[float]:
    """Run the optimizer loop; returns the loss of every step (before its update)."""
    from tqdm.auto import tqdm

    total, per_epoch = plan_steps(len(train), config.batch_size, epochs=config.epochs, steps=config.steps,
                                  min_steps=config.min_steps)
    keep_4bit_trainable(model)  # whatever ran before (an eval pass, a merge, a served forward)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate(), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(config.schedule, s, total, config.warmup()))
    shuffler = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(total=total, desc=f"train {config.kind}", unit="step", disable=not config.progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        while len(losses) < total:
            for batch in batches(train, config.batch_size, shuffler):
                loss_sum, count = token_loss_sums(model, collate(batch, pad_id))
                loss = loss_sum / max(count, 1)
                if not torch.isfinite(loss):
                    raise TrainError(f"the loss became {float(loss)} at step {len(losses) + 1}; lower --lr")
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if len(losses) % per_epoch == 0 or len(losses) == total:
                    log.debug("step %d/%d loss %.4f", len(losses), total, losses[-1])
                if len(losses) >= total:
                    break
    finally:
        bar.close()
    return losses
