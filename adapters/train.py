"""The adapter trainer: ``adapterctl train`` and :func:`train_adapter`, producing PEFT adapter dirs.

Trains one LoRA (``--lora-bias``: with a trained lora_B bias), DoRA, IA3, prefix-tuning, prompt-tuning or
P-tuning adapter with HF PEFT on a Llama-family base -- by default the
server's default model (SmolLM2-135M-Instruct, :mod:`server.model.default_model`); ``--base`` takes a
checkpoint dir, a ``.gguf`` file or ``tiny-llama-builtin``, as the server's ``--model`` -- from a JSONL
dataset (see :mod:`adapters.dataset`), and writes a standard PEFT directory -- exactly
``adapter_config.json`` + ``adapter_model.safetensors`` -- that PEFT's ``from_pretrained`` and this
project's server load without conversion.

* ``--kind houlsby|pfeiffer|parallel``: AdapterHub bottleneck adapters, trained with our own modules (not the
  library, which needs transformers 4.57) and written in the library's format (``adapter_config.json`` +
  ``adapter.safetensors``), which the library and the server both load (:mod:`adapters.train_bottleneck`).
* The step rule: without ``--steps``, training runs ``max(ceil(epochs * ceil(rows / batch)), --min-steps)``
  optimizer steps (``--epochs`` 3, ``--min-steps`` 30 by default): 12 rows at batch 4 are 30 steps
  (10 epochs), not 9; from 40 rows on, epochs decide. Measured on the default model with the demo
  task (adapters/demo.py): after 9 steps 0, 7 and 8 of 12 held-out answers (LoRA, IA3, prefix) were
  in the trained format, after 30 steps 12, 12 and 11.
* Default learning rates per kind (:data:`adapters.train_config.DEFAULT_LR`, with the table of what was measured
  there): LoRA, lora-bias and DoRA 1e-3 (q_proj, v_proj, rank 8), IA3 1e-2, prefix 2e-2 (16 virtual tokens,
  initialised from the base's own keys and values of the training answers, :func:`adapters.train_model.init_prefix`),
  prompt tuning 3e-2 (started from the word embeddings of the answers, :func:`adapters.train_model.init_prompt`;
  from PEFT's random start it learns nothing in 30 steps), P-tuning 1e-2 after 5 warmup steps
  (:data:`adapters.train_config.DEFAULT_WARMUP`; PEFT's MLP encoder; PEFT saves the encoder's output as
  ``prompt_embeddings``, which the server serves). On the demo task every kind answers 11 or 12 of 12 held-out
  questions in the trained format after 30 steps.
* Target names are the server's (``server.model.adapter_layers.TARGET_MODULES``); a LoRA rank above
  the server's default ``--max-lora-rank`` (``server.config.EngineConfig``, 64) is warned about
  before training: a default server refuses it at upload.
* Loss on completion tokens only; rows are tokenized exactly as the server tokenizes requests.
* ``--quantization nf4`` trains QLoRA-style over a bitsandbytes 4-bit base (compute in fp32), after
  ``peft.prepare_model_for_kbit_training`` without gradient checkpointing (measured on the built-in
  model, CPU: checkpointing costs ~40% per step, skipping the preparation ~25%). It works on the
  default model (every input size a multiple of 64): LoRA steps took 1.6 and 2.7 s there, an fp32
  run between them 4.2 s (a busy machine: not slower, at least).
* Deterministic on CPU: the same seed, data and torch thread count give byte-identical safetensors.
* Threads: on a busy 2-core machine one thread (``--threads 1``) can be many times faster than two,
  because OpenMP threads wait on each other when a core is taken.
* A held-out split (``--eval-fraction`` or ``--eval-data``) reports eval loss before and after.
* Atomic: training writes into a temp dir next to ``--out`` that is renamed into place only
  after the result has passed the server's own adapter validation (:func:`adapters.format.load_adapter`);
  a crash leaves no half-written adapter.
* ``--upload NAME`` sends the result to a running server (``POST /v1/adapters``).

Usage::

    adapterctl train --kind lora --data rows.jsonl --out ./my-lora
    python -m adapters.train --kind prefix --data rows.jsonl --out ./p --upload my-prefix

The work is split by job: options, defaults and the step rule (:mod:`adapters.train_config`), the
model and the loop (:mod:`adapters.train_model`), output and upload (:mod:`adapters.train_io`), the
command line (:mod:`adapters.train_cli`); this module runs one training and re-exports the API.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapters.dataset import DatasetError, Example, load_examples, split_examples
from adapters.format import AdapterError, BaseSpec, load_adapter
from adapters.train_cli import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, build_parser, main
from adapters.train_config import (BOTTLENECK_KINDS, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_TARGETS, KINDS, LINEAR_TARGETS, MIN_STEPS,
                                   PREFIX_INITS, QUANTIZATIONS, SCHEDULES, SERVER_MAX_RANK, VIRTUAL_TOKEN_KINDS,
                                   TrainConfig, TrainError,
                                   TrainResult, check_rank, log, plan_steps)
from adapters.train_io import UploadError, publish, save_adapter, save_bottleneck_adapter, upload_adapter
from adapters.train_model import (build_model, evaluate, fit, init_prefix, init_prompt, load_base_model, load_tokenizer,
                                  resolve_base, resolve_device, token_loss_sums)

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_LR", "DEFAULT_TARGETS", "EXIT_OK", "EXIT_REFUSED", "EXIT_UNREACHABLE",
           "EXIT_USAGE", "KINDS", "LINEAR_TARGETS", "MIN_STEPS", "QUANTIZATIONS", "SCHEDULES", "SERVER_MAX_RANK",
           "DatasetError", "TrainConfig", "TrainError", "TrainResult", "UploadError", "build_parser", "main",
           "plan_steps", "save_adapter", "token_loss_sums", "train_adapter", "upload_adapter"]


def train_adapter(config: TrainConfig) -> TrainResult:
    """Train one adapter as ``config`` says and write it to ``config.out`` (atomically).

    Raises :class:`adapters.dataset.DatasetError` for a bad dataset (with line numbers) and
    :class:`TrainError` for bad options, a base that cannot be used, or a non-finite loss.
    """
    if config.kind not in KINDS:
        raise TrainError(f"unknown kind {config.kind!r}; choose one of {', '.join(KINDS)}")
    if config.schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if config.prefix_init not in PREFIX_INITS:
        raise TrainError(f"unknown prefix init {config.prefix_init!r}; choose one of {', '.join(PREFIX_INITS)}")
    check_rank(config)  # warns before the slow part
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
    if limit and config.kind in VIRTUAL_TOKEN_KINDS:
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
    if config.kind in BOTTLENECK_KINDS:
        from adapters.train_bottleneck import check

        check(config, spec.hidden_size)  # before the slow part
    train, held = read_data(config, tokenizer, hf_config, base)  # before the (slow) model load
    total_steps, per_epoch = plan_steps(len(train), config.batch_size, epochs=config.epochs, steps=config.steps,
                                        min_steps=config.min_steps)
    if config.steps is None and total_steps > (config.epochs or DEFAULT_EPOCHS) * per_epoch:
        log.info("%d rows are %d steps per epoch: training %d steps (%.1f epochs), the minimum (--min-steps)",
                 len(train), per_epoch, total_steps, total_steps / per_epoch)
    device = resolve_device(config.device)
    model = build_model(config, load_base_model(base, hf_config, config.quantization, device), spec, base.name)
    if config.kind == "prefix" and config.prefix_init == "answers":
        init_prefix(model, train)
    if config.kind == "prompt" and config.prefix_init == "answers":
        init_prompt(model, train)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    log.info("training a %s adapter on %s (quantization %s, %s): %d train / %d eval rows, %d trainable "
             "parameters, %d steps at lr %g", config.kind, base.name, config.quantization, device, len(train),
             len(held), trainable, total_steps, config.learning_rate())
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
    _write(model, out, spec, config.overwrite, config.kind)
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


def _write(model, out: Path, spec: BaseSpec, overwrite: bool, kind: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if kind in BOTTLENECK_KINDS:  # AdapterHub's format: adapter_config.json + adapter.safetensors
            from adapters.train_bottleneck import adapter_name, width

            save_bottleneck_adapter(model, tmp, adapter_name(out))
            rank = width(model.adapters.config, spec.hidden_size)
        else:
            save_adapter(model, tmp)
            peft_cfg = model.peft_config["default"]
            rank = int(peft_cfg.r) if peft_cfg.peft_type == "LORA" else 0
        try:  # the server's own checks, with the rank limit the warning above already named
            load_adapter(tmp, spec, max_rank=max(SERVER_MAX_RANK, rank))
        except AdapterError as exc:
            raise TrainError(f"the trained adapter would be refused by the server: {exc}") from None
        publish(tmp, out, overwrite)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
