"""The adapter trainer: ``adapterctl train`` and :func:`train_adapter`, producing PEFT adapter dirs.

Trains one LoRA, IA3 or prefix-tuning adapter with HF PEFT on a Llama-family base (default: the
built-in tiny model) from a JSONL dataset (see :mod:`adapters.dataset`), and writes a standard
PEFT directory -- exactly ``adapter_config.json`` + ``adapter_model.safetensors`` -- that PEFT's
``from_pretrained`` and this project's server load without conversion.

* Loss on completion tokens only; rows are tokenized exactly as the server tokenizes requests.
* ``--quantization nf4`` trains QLoRA-style over a bitsandbytes 4-bit base (compute in fp32), after
  ``peft.prepare_model_for_kbit_training`` without gradient checkpointing (measured on the built-in
  model, CPU: checkpointing costs ~40% per step, skipping the preparation ~25%). For larger bases on
  CPU expect it to be much slower than ``none``: bitsandbytes is only fast in eval mode.
* Deterministic on CPU: the same seed, data and torch thread count give byte-identical safetensors.
* Threads: on a busy 2-core machine one thread (``--threads 1``) can be many times faster than two
  for small models, because OpenMP threads wait on each other when a core is taken.
* A held-out split (``--eval-fraction`` or ``--eval-data``) reports eval loss before and after.
* Atomic: training writes into a temp dir next to ``--out`` that is renamed into place only
  after the result has passed the server's own adapter validation (:func:`adapters.format.load_adapter`);
  a crash leaves no half-written adapter.
* ``--upload NAME`` sends the result to a running server (``POST /v1/adapters``).

Usage::

    adapterctl train --kind lora --data rows.jsonl --out ./my-lora --steps 200 --lr 1e-3
    python -m adapters.train --kind prefix --data rows.jsonl --out ./p --upload my-prefix
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from adapters.dataset import DatasetError, Example, batches, collate, load_examples, split_examples
from adapters.format import CONFIG_NAME, WEIGHTS_NAME, AdapterError, BaseSpec, load_adapter
from adapters.fsutil import fsync_path

log = logging.getLogger(__name__)

KINDS = ("lora", "ia3", "prefix")
QUANTIZATIONS = ("none", "nf4")
SCHEDULES = ("constant", "linear", "cosine")
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Defaults meant for real bases; tiny tasks on the built-in model want larger rates (see README).
DEFAULT_LR = {"lora": 2e-4, "ia3": 3e-3, "prefix": 1e-2}
DEFAULT_TARGETS = {"lora": ("q_proj", "v_proj"), "ia3": ("k_proj", "v_proj", "down_proj")}
DEFAULT_EPOCHS = 3
SERVER_MAX_RANK = 64  # EngineConfig.max_lora_rank's default
DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = ("ADAPTER_SERVER_URL", "ADAPTERCTL_SERVER")
API_KEY_ENV = ("ADAPTER_SERVER_API_KEY", "ADAPTERCTL_API_KEY")
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3  # as adapterctl


class TrainError(RuntimeError):
    """Training could not produce a servable adapter (bad base, bad options, refused result)."""


class UploadError(RuntimeError):
    """The server refused the upload (``unreachable=True``: it could not be reached at all)."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass
class TrainConfig:
    """Everything one training run needs. ``None`` fields take the per-kind defaults above."""

    kind: str
    data: Path
    out: Path
    base: Path | None = None              # HF checkpoint dir; None = the built-in tiny model
    cache_dir: Path | None = None         # where the built-in model lives (None: its default)
    quantization: str = "none"            # "nf4": QLoRA-style over a 4-bit base
    device: str = "auto"                  # auto: cuda if available, else cpu
    # LoRA
    rank: int = 8
    alpha: float | None = None            # None: 2 * rank
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # LoRA / IA3 target modules (short names)
    # IA3: which targets scale their input (feedforward_modules); None: down_proj if targeted (as PEFT)
    feedforward: tuple[str, ...] | None = None
    # prefix tuning
    virtual_tokens: int = 16
    # schedule
    epochs: float | None = None           # used when steps is None (then DEFAULT_EPOCHS)
    steps: int | None = None              # optimizer steps; wins over epochs
    lr: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # evaluation
    eval_data: Path | None = None         # a separate held-out JSONL; wins over eval_fraction
    eval_fraction: float = 0.1            # floor(n * fraction) rows held out (0: none)
    # output
    overwrite: bool = False
    progress: bool = True                 # tqdm bar on stderr
    threads: int | None = None            # torch threads during training (None: unchanged)


@dataclass
class TrainResult:
    """What a run produced. Losses are mean cross-entropy per completion token."""

    out: Path
    kind: str
    base: str
    steps: int
    epochs: float
    num_train: int
    num_eval: int
    trainable_params: int
    train_loss_start: float               # the first step's batch loss (before any update)
    train_loss_end: float                 # mean batch loss over the last epoch's worth of steps
    eval_loss_start: float | None
    eval_loss_end: float | None
    seconds: float                        # training loop only (not loading the base or saving)
    losses: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        del data["losses"]
        return data


# ------------------------------------------------------------------------------------------ model


def resolve_base(config: TrainConfig) -> Path:
    """The base checkpoint directory: ``config.base`` or the built-in model (created on first use)."""
    if config.base is None:
        from server.model.builtin import ensure_builtin_model

        return ensure_builtin_model(config.cache_dir)
    base = Path(config.base).expanduser()
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
            _check_nf4_shapes(hf_config, base)
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


def _check_nf4_shapes(hf_config, base: Path) -> None:
    """bitsandbytes' CPU NF4 path fails at the first forward unless every in_features is a multiple of 64."""
    spec = BaseSpec.from_hf_config(hf_config, base.name)
    bad = sorted({m for m, (fan_in, _) in spec.module_shapes.items() if fan_in % 64})
    if bad:
        raise TrainError(f"--quantization nf4 on CPU needs every linear layer's input size to be a multiple of 64 "
                         f"(bitsandbytes' block size); {', '.join(bad)} of {base} are not: use --quantization none")


def peft_config(config: TrainConfig, spec: BaseSpec):
    """The PEFT config for ``config.kind``, restricted to what the server serves exactly."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType

    if config.kind == "prefix":
        if config.virtual_tokens <= 0:
            raise TrainError("--virtual-tokens must be positive")
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens,
                                  prefix_projection=False)
    targets = tuple(config.targets or DEFAULT_TARGETS[config.kind])
    unknown = sorted(set(targets) - set(spec.module_shapes))
    if unknown or not targets:
        raise TrainError(f"--targets {','.join(unknown) or '(none)'}: choose among {', '.join(spec.module_shapes)}")
    if config.kind == "lora":
        if config.rank <= 0:
            raise TrainError("--rank must be positive")
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.rank, lora_alpha=config.alpha or 2 * config.rank,
                          lora_dropout=config.dropout, target_modules=list(targets), bias="none")
    if config.kind == "ia3":
        ff = config.feedforward
        if ff is None:
            ff = tuple(t for t in targets if t == "down_proj")  # PEFT's default for Llama
        if not set(ff) <= set(targets):
            raise TrainError(f"--feedforward {','.join(ff)} must be a subset of --targets {','.join(targets)}")
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(targets), feedforward_modules=list(ff))
    raise TrainError(f"unknown kind {config.kind!r}; choose one of {', '.join(KINDS)}")


def build_model(config: TrainConfig, base_model, spec: BaseSpec, base_name: str):
    """Wrap ``base_model`` with a fresh PEFT adapter (initialised from ``config.seed``)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if config.quantization == "nf4":
        # Casts the remaining fp16/bf16 parameters to fp32; no gradient checkpointing (only slower here).
        base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
    torch.manual_seed(config.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base_model, peft_config(config, spec))
    model.peft_config["default"].base_model_name_or_path = base_name
    return model


# ------------------------------------------------------------------------------------------ training


def token_loss_sums(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, their number) for one batch."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:].to(device)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


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


def _lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _plan(config: TrainConfig, num_train: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch)."""
    if config.batch_size <= 0:
        raise TrainError("--batch-size must be positive")
    per_epoch = math.ceil(num_train / config.batch_size)
    if config.steps is not None:
        if config.steps <= 0:
            raise TrainError("--steps must be positive")
        return config.steps, per_epoch
    epochs = DEFAULT_EPOCHS if config.epochs is None else config.epochs
    if epochs <= 0:
        raise TrainError("--epochs must be positive")
    return max(1, math.ceil(epochs * per_epoch)), per_epoch


def fit(model, train: Sequence[Example], config: TrainConfig, pad_id: int) -> list[float]:
    """Run the optimizer loop; returns the loss of every step (before its update)."""
    from tqdm.auto import tqdm

    total, per_epoch = _plan(config, len(train))
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.kind]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(config.schedule, s, total, config.warmup_steps))
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


# ------------------------------------------------------------------------------------------ output


def save_adapter(model, dest: Path) -> None:
    """Write exactly adapter_config.json + adapter_model.safetensors into the (empty) dir ``dest``."""
    scratch = Path(tempfile.mkdtemp(prefix=".save-", dir=dest))
    try:
        # save_embedding_layers=False: embeddings are never trained here, and "auto" would look the
        # base name up on the model hub.
        model.save_pretrained(str(scratch), safe_serialization=True, save_embedding_layers=False)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            os.replace(scratch / name, dest / name)  # PEFT's README.md model card stays behind
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config = json.loads((dest / CONFIG_NAME).read_text())
    (dest / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        os.chmod(dest / name, 0o666 & ~umask)
        fsync_path(dest / name)
    os.chmod(dest, 0o777 & ~umask)  # mkdtemp made it private
    fsync_path(dest)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is replaced only with ``overwrite``."""
    if out.exists() and not overwrite:
        raise TrainError(f"--out {out} already exists; pass --overwrite to replace it")
    trash = None
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / "old")
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if trash is not None:
            os.rename(trash / "old", out)  # put the previous adapter back
        raise TrainError(f"cannot move the trained adapter to {out}: {exc}") from None
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    fsync_path(out.parent)


# ------------------------------------------------------------------------------------------ API


def train_adapter(config: TrainConfig) -> TrainResult:
    """Train one adapter as ``config`` says and write it to ``config.out`` (atomically).

    Raises :class:`adapters.dataset.DatasetError` for a bad dataset (with line numbers) and
    :class:`TrainError` for bad options, a base that cannot be used, or a non-finite loss.
    """
    if config.kind not in KINDS:
        raise TrainError(f"unknown kind {config.kind!r}; choose one of {', '.join(KINDS)}")
    if config.schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    out = Path(config.out).expanduser().absolute()
    if out.exists() and not config.overwrite:
        raise TrainError(f"--out {out} already exists; pass --overwrite to replace it")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, out)
    finally:
        torch.set_num_threads(threads)


def read_data(config: TrainConfig, tokenizer, hf_config, base: Path) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples: ``--eval-data`` if given, else a seeded ``--eval-fraction`` split."""
    limit = int(getattr(hf_config, "max_position_embeddings", 0) or 0) or None
    if limit and config.kind == "prefix":
        limit -= config.virtual_tokens  # the virtual tokens take KV-cache positions too
    stop_ids = _stop_ids(base)
    examples = load_examples(config.data, tokenizer, stop_ids=stop_ids, max_length=limit)
    if config.eval_data is not None:
        return examples, load_examples(config.eval_data, tokenizer, stop_ids=stop_ids, max_length=limit)
    train, held = split_examples(examples, config.eval_fraction, config.seed)
    if config.eval_fraction > 0 and not held:
        log.info("%d rows are too few to hold out %.0f%% for evaluation; no eval loss (use --eval-data)",
                 len(examples), 100 * config.eval_fraction)
    return train, held


def _train(config: TrainConfig, out: Path) -> TrainResult:
    base = resolve_base(config)
    tokenizer, hf_config = load_tokenizer(base)
    spec = BaseSpec.from_hf_config(hf_config, base.name)
    train, held = read_data(config, tokenizer, hf_config, base)  # before the (slow) model load
    total_steps, per_epoch = _plan(config, len(train))
    device = resolve_device(config.device)
    model = build_model(config, load_base_model(base, hf_config, config.quantization, device), spec, base.name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    log.info("training a %s adapter on %s (quantization %s, %s): %d train / %d eval rows, %d trainable "
             "parameters, %d steps", config.kind, base.name, config.quantization, device, len(train), len(held),
             trainable, total_steps)
    eval_start = evaluate(model, held, config.batch_size, pad_id)
    started = time.perf_counter()
    losses = fit(model, train, config, pad_id)
    seconds = time.perf_counter() - started
    eval_end = evaluate(model, held, config.batch_size, pad_id)
    tail = losses[-min(per_epoch, len(losses)):]
    result = TrainResult(out=out, kind=config.kind, base=base.name, steps=len(losses),
                         epochs=len(losses) / per_epoch, num_train=len(train), num_eval=len(held),
                         trainable_params=trainable, train_loss_start=losses[0],
                         train_loss_end=sum(tail) / len(tail), eval_loss_start=eval_start, eval_loss_end=eval_end,
                         seconds=seconds, losses=losses)
    _write(model, out, spec, config.overwrite)
    log.info("wrote %s: train loss %.4f -> %.4f%s in %d steps (%.1f s)", out, result.train_loss_start,
             result.train_loss_end, "" if eval_end is None else f", eval loss {eval_start:.4f} -> {eval_end:.4f}",
             result.steps, seconds)
    return result


def _stop_ids(base: Path) -> list[int]:
    """The generation config's eos ids (the server stops on these too)."""
    try:
        eos = json.loads((base / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]


def _write(model, out: Path, spec: BaseSpec, overwrite: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_adapter(model, tmp)
        peft_cfg = model.peft_config["default"]
        rank = int(peft_cfg.r) if peft_cfg.peft_type == "LORA" else 0
        if rank > SERVER_MAX_RANK:
            log.warning("LoRA rank %d exceeds the server's default max rank %d: serve it with a larger "
                        "--max-lora-rank", rank, SERVER_MAX_RANK)
        try:
            load_adapter(tmp, spec, max_rank=max(SERVER_MAX_RANK, rank))
        except AdapterError as exc:
            raise TrainError(f"the trained adapter would be refused by the server: {exc}") from None
        _publish(tmp, out, overwrite)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ upload


def _env(names: Sequence[str]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def upload_adapter(path: str | Path, name: str, *, server: str | None = None, api_key: str | None = None,
                   overwrite: bool = False, timeout: float = 120.0) -> dict:
    """POST the adapter dir ``path`` to ``{server}/v1/adapters`` as ``name``; returns the server's JSON.

    ``server`` defaults to ``$ADAPTER_SERVER_URL`` (or ``$ADAPTERCTL_SERVER``), else
    http://127.0.0.1:8000; ``api_key`` to ``$ADAPTER_SERVER_API_KEY`` (or ``$ADAPTERCTL_API_KEY``).
    Raises :class:`UploadError`.
    """
    import httpx

    server = (server or _env(SERVER_ENV) or DEFAULT_SERVER).rstrip("/").removesuffix("/v1")
    api_key = api_key or _env(API_KEY_ENV)
    path = Path(path)
    files = [("files", (n, (path / n).read_bytes(), "application/octet-stream")) for n in (CONFIG_NAME, WEIGHTS_NAME)]
    data = {"name": name, **({"overwrite": "true"} if overwrite else {})}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(f"{server}/v1/adapters", data=data, files=files, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise UploadError(f"cannot reach {server}: {exc}", unreachable=True) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise UploadError(f"{server} refused the upload of {name!r}: {response.status_code} "
                          f"{message or response.reason_phrase}")
    return body if isinstance(body, dict) else {}


# ------------------------------------------------------------------------------------------ CLI


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser(prog: str = "adapterctl train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a LoRA, IA3 or prefix-tuning adapter (PEFT format) on a JSONL dataset.",
        epilog="Dataset rows: {\"prompt\": ..., \"completion\": ...} or {\"messages\": [..., "
               "{\"role\": \"assistant\", \"content\": ...}]}. Loss is on the completion only.")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the adapter directory to write")
    p.add_argument("--base", type=Path, metavar="PATH", help="HF checkpoint dir (default: the built-in tiny model)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="nf4: QLoRA-style training over a 4-bit bitsandbytes base")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda[:N]")
    g = p.add_argument_group("LoRA / IA3")
    g.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 2 * rank)")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    g.add_argument("--targets", type=_csv, metavar="M1,M2",
                   help=f"target modules among {','.join(LINEAR_TARGETS)} (default LoRA "
                        f"{','.join(DEFAULT_TARGETS['lora'])}; IA3 {','.join(DEFAULT_TARGETS['ia3'])})")
    g.add_argument("--feedforward", type=_csv, metavar="M1,M2",
                   help="IA3 modules that scale their input (default: down_proj when targeted)")
    g = p.add_argument_group("prefix tuning")
    g.add_argument("--virtual-tokens", type=int, default=16, help="prefix length (default 16)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=float, help=f"passes over the data (default {DEFAULT_EPOCHS})")
    g.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float,
                   help="learning rate (default " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", type=Path, metavar="FILE.jsonl", help="held-out rows (instead of a split)")
    g.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of --data held out for eval loss when no --eval-data (default 0.1)")
    g = p.add_argument_group("output and upload")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out dir, and an adapter of the same name on the server")
    g.add_argument("--upload", metavar="NAME", help="upload the result to a running server under NAME")
    g.add_argument("--server", help=f"server URL (default ${SERVER_ENV[0]} or {DEFAULT_SERVER})")
    g.add_argument("--api-key", help=f"admin API key (default ${API_KEY_ENV[0]})")
    g.add_argument("--cache-dir", type=Path, help="cache of the built-in model")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        kind=args.kind, data=args.data, out=args.out, base=args.base, cache_dir=args.cache_dir,
        quantization=args.quantization, device=args.device, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        targets=args.targets, feedforward=args.feedforward, virtual_tokens=args.virtual_tokens,
        epochs=args.epochs, steps=args.steps, lr=args.lr, schedule=args.schedule,
        warmup_steps=args.warmup_steps, batch_size=args.batch_size, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, seed=args.seed, eval_data=args.eval_data,
        eval_fraction=args.eval_fraction, overwrite=args.overwrite, progress=not args.no_progress,
        threads=args.threads)


def _print_result(result: TrainResult, uploaded: dict | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**result.summary(), "uploaded": uploaded}, indent=2))
        return
    print(f"wrote {result.kind} adapter to {result.out} (base {result.base}, {result.trainable_params} "
          f"trainable parameters)")
    print(f"  {result.steps} steps ({result.epochs:.1f} epochs) on {result.num_train} rows in {result.seconds:.1f} s; "
          f"train loss {result.train_loss_start:.4f} -> {result.train_loss_end:.4f}")
    if result.eval_loss_end is not None:
        print(f"  eval loss on {result.num_eval} held-out rows: {result.eval_loss_start:.4f} -> "
              f"{result.eval_loss_end:.4f}")
    if uploaded is not None:
        print(f"  uploaded as {uploaded.get('name', '?')}")


def main(argv: Sequence[str] | None = None, prog: str = "adapterctl train") -> int:
    """The training CLI; returns an exit code (0 ok, 1 server refused, 2 bad input, 3 server unreachable)."""
    args = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("bitsandbytes", "transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the "Loading weights" bar
    try:
        result = train_adapter(config_from_args(args))
    except (DatasetError, TrainError) as exc:
        print(f"{prog}: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    uploaded = None
    if args.upload:
        try:
            uploaded = upload_adapter(result.out, args.upload, server=args.server, api_key=args.api_key,
                                      overwrite=args.overwrite)
            uploaded.setdefault("name", args.upload)
        except UploadError as exc:
            _print_result(result, None, args.json)
            print(f"{prog}: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_UNREACHABLE if exc.unreachable else EXIT_REFUSED
    _print_result(result, uploaded, args.json)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
