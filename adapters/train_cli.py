"""``adapterctl train`` / ``python -m adapters.train``: the trainer's command line (see :mod:`adapters.train`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from adapters.kinds.bottleneck import ACTIVATIONS as BN_ACTIVATIONS
from adapters.dataset import DatasetError
from adapters.train_config import (DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_WARMUP, DEFAULT_TARGETS, KINDS, LINEAR_TARGETS, MIN_STEPS,
                                   PREFIX_INITS, QUANTIZATIONS, SCHEDULES, SERVER_MAX_RANK, TrainConfig, TrainError,
                                   TrainResult)
from adapters.train_io import API_KEY_ENV, DEFAULT_SERVER, SERVER_ENV, UploadError, upload_adapter

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3  # as adapterctl


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser(prog: str = "adapterctl train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a LoRA, DoRA, IA3, prefix-tuning, prompt-tuning or P-tuning adapter (PEFT format) on a "
                    "JSONL dataset.",
        epilog="Dataset rows: {\"prompt\": ..., \"completion\": ...} or {\"messages\": [..., "
               "{\"role\": \"assistant\", \"content\": ...}]}. Loss is on the completion only.")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the adapter directory to write")
    p.add_argument("--base", type=Path, metavar="PATH",
                   help="HF checkpoint dir or .gguf file, or tiny-llama-builtin (default: the server's default "
                        "model, SmolLM2-135M-Instruct)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="nf4: QLoRA-style training over a 4-bit bitsandbytes base")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda[:N]")
    g = p.add_argument_group("LoRA / DoRA / IA3")
    g.add_argument("--rank", "-r", type=int, default=8,
                   help=f"LoRA rank (default 8; a default adapter-server accepts up to {SERVER_MAX_RANK}, "
                        "its --max-lora-rank)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 2 * rank)")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    g.add_argument("--lora-bias", action="store_true",
                   help="--kind lora: also train a bias of lora_B (PEFT lora_bias; served as a per-slot bias)")
    g.add_argument("--targets", type=_csv, metavar="M1,M2",
                   help=f"target modules among {','.join(LINEAR_TARGETS)} (default LoRA "
                        f"{','.join(DEFAULT_TARGETS['lora'])}; IA3 {','.join(DEFAULT_TARGETS['ia3'])})")
    g.add_argument("--feedforward", type=_csv, metavar="M1,M2",
                   help="IA3 modules that scale their input (default: down_proj when targeted)")
    g = p.add_argument_group("prefix / prompt tuning / P-tuning")
    g.add_argument("--virtual-tokens", type=int, default=16, help="virtual tokens (default 16)")
    g.add_argument("--prefix-init", "--prompt-init", dest="prefix_init", choices=PREFIX_INITS, default="answers",
                   help="answers (default): prefix: start from the base's keys and values of the training answers; "
                        "prompt: from the answers' word embeddings; random: PEFT's init (ptuning: always PEFT's)")
    g.add_argument("--encoder-hidden-size", type=int,
                   help="ptuning: the prompt encoder MLP's width (default: the base's hidden size)")
    g = p.add_argument_group("bottleneck (houlsby / pfeiffer / parallel: AdapterHub's double_seq_bn / seq_bn / par_bn)")
    g.add_argument("--reduction-factor", type=float,
                   help="width int(hidden // factor) (default the library's: 16, 16, 2)")
    g.add_argument("--activation", choices=BN_ACTIVATIONS,
                   help="the bottleneck's non-linearity (default the library's: swish, relu, relu)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=float,
                   help=f"passes over the data (default {DEFAULT_EPOCHS}), extended to --min-steps steps")
    g.add_argument("--min-steps", type=int, default=MIN_STEPS,
                   help=f"without --steps, train at least this many steps (default {MIN_STEPS}; 0: epochs decide)")
    g.add_argument("--steps", type=int, help="optimizer steps exactly (overrides --epochs and --min-steps)")
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float,
                   help="learning rate (default " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule")
    g.add_argument("--warmup-steps", type=int,
                   help="linear learning-rate warmup (default " + ", ".join(f"{k} {DEFAULT_WARMUP.get(k, 0)}" for k in KINDS)
                        + ")")
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
    g.add_argument("--cache-dir", type=Path,
                   help="the model cache (default $ADAPTER_SERVER_CACHE or ~/.cache/adapter-server)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        kind=args.kind, data=args.data, out=args.out, base=args.base, cache_dir=args.cache_dir,
        quantization=args.quantization, device=args.device, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        lora_bias=args.lora_bias, encoder_hidden_size=args.encoder_hidden_size,
        targets=args.targets, feedforward=args.feedforward, virtual_tokens=args.virtual_tokens,
        prefix_init=args.prefix_init, reduction_factor=args.reduction_factor, activation=args.activation,
        epochs=args.epochs, steps=args.steps, min_steps=args.min_steps, lr=args.lr,
        schedule=args.schedule, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        eval_data=args.eval_data, eval_fraction=args.eval_fraction, overwrite=args.overwrite,
        progress=not args.no_progress, threads=args.threads)


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
    from adapters.train import train_adapter  # not at import: adapters.train re-exports this module's main

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

