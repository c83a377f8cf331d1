"""What one training run is: options, defaults, the step rule and the result (see :mod:`adapters.train`).

Module names and the rank limit come from the server, their single source:
``server.model.adapter_layers.TARGET_MODULES`` (what the server wraps) and
``server.config.EngineConfig.max_lora_rank`` (the default ``--max-lora-rank``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.config import EngineConfig
from server.model.adapter_layers import TARGET_MODULES
from server.model.builtin import BUILTIN_MODEL_NAME

log = logging.getLogger("adapters.train")

KINDS = ("lora", "dora", "ia3", "prefix", "prompt", "ptuning", "houlsby", "pfeiffer", "parallel")
BOTTLENECK_KINDS = ("houlsby", "pfeiffer", "parallel")  # our own modules, AdapterHub's format (adapters.train_bottleneck)
LORA_KINDS = ("lora", "dora")               # LoraConfig (dora: use_dora=True)
VIRTUAL_TOKEN_KINDS = ("prefix", "prompt", "ptuning")
QUANTIZATIONS = ("none", "nf4")
PREFIX_INITS = ("answers", "random")  # prefix: the answers' keys/values; prompt: the answers' token embeddings
SCHEDULES = ("constant", "linear", "cosine")
LINEAR_TARGETS = TARGET_MODULES
BUILTIN_BASES = (BUILTIN_MODEL_NAME,)  # --base values that name the built-in tiny model (as the server's --model)
# The default learning rate (and warmup) per kind, measured on the default model (SmolLM2-135M-Instruct, fp32, CPU,
# one thread) with the demo task (adapters/demo.py: 24 chat rows, batch 4, the rule's 30 steps, seed 0 unless
# noted). "held-out" = answers of the 12 held-out questions in the trained format (greedy, 16 tokens); losses are
# per completion token, train = mean of the last epoch; eval on the 12 held-out rows (start: the kind's init).
#
#   kind       lr      held-out        train loss    eval loss        notes
#   lora       1e-3    12/12           4.2 -> 1.20   3.7 -> 2.15      q,v rank 8; 2e-3 on all seven modules: 3.1
#   lora-bias  1e-3    11/12           4.2 -> 0.94   3.7 -> 2.2       as lora, + lora_B bias
#   dora       1e-3    12/12           4.2 -> 1.18   3.7 -> 2.16
#              3e-3     9/12           4.2 -> 0.32   3.7 -> 2.8       memorises the rows
#   ia3        1e-2    12/12           4.2 -> 0.42   3.7 -> 2.23
#   prefix     1e-2    10/12                         3.3 -> 2.2       16 tokens, init: the answers' keys/values
#              2e-2    11/12           3.8 -> 0.60   3.3 -> 2.7
#              3e-2    11/12                         3.3 -> 3.0
#   prompt     1e-2     9/12           3.8 -> 1.83   3.27 -> 1.98     16 tokens, init: the answers' embeddings
#              2e-2    11/12           3.8 -> 1.76   3.27 -> 1.98
#              3e-2    12/12, 11/12    3.8 -> 1.73   3.27 -> 1.84, 2.04 (seeds 0, 1)
#              5e-2     9/12           3.8 -> 1.71   3.27 -> 1.99
#              1e-1     8/12           3.8 -> 1.84   3.27 -> 1.95
#              3e-2     0/12 (random init)   4.0 -> 2.34   3.86 -> 2.46
#   ptuning    1e-3     0/12           3.9 -> 3.06   3.56 -> 3.13     16 tokens, PEFT's MLP encoder (width 576)
#              3e-3    10/12, 8/12     3.9 -> 2.56   3.56 -> 2.23, 2.55 (seeds 0, 1)
#              5e-3     0/12, 7/12                   3.56 -> 2.65, 2.22 (seeds 0, 1)
#              1e-2    10, 11, 11/12                 -> 2.21, 3.00, 2.59 (seeds 0, 1, 2); first steps jump to 5-6
#              1e-2 + 5 warmup steps: 12, 12, 12/12  -> 2.36, 2.35, 2.18 (seeds 0, 1, 2)  <- the default
#              3e-2     3/12                         3.56 -> 2.54; with a cosine schedule 0/12, 4.4
#              1e-2, encoder width 128: 11, 10, 12/12 (seeds 0-2); with 5 warmup steps 5, 0/12
#              encoder started as the identity on the answers' embeddings (width 1152): 1e-4 / 3e-4 / 1e-3:
#              8 / 10 / 2 of 12 -- not better than PEFT's random start
#
# Bottleneck kinds (AdapterHub houlsby / pfeiffer / parallel, the library's defaults; the demo trains parallel at
# reduction 16, width 36, since the library's 2 gives 288, above a default server's --max-lora-rank 64):
BOTTLENECK_LR = {"houlsby": 1e-3, "pfeiffer": 1e-3, "parallel": 1e-3}
#
# Without an answers init prompt tuning does not learn the format in 30 steps; P-tuning's MLP encoder moves all
# virtual tokens together, and a short warmup keeps Adam's first full-size steps from throwing them off.
# The random built-in tiny model wants larger rates still (tests/test_train.py).
DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "ia3": 1e-2, "prefix": 2e-2, "prompt": 3e-2, "ptuning": 1e-2,
              **BOTTLENECK_LR}
DEFAULT_WARMUP = {"ptuning": 5}  # linear warmup steps without --warmup-steps (others: 0)
DEFAULT_TARGETS = {"lora": ("q_proj", "v_proj"), "dora": ("q_proj", "v_proj"), "ia3": ("k_proj", "v_proj", "down_proj")}
DEFAULT_EPOCHS = 3
# The step rule: without --steps, train max(ceil(epochs * ceil(rows / batch)), MIN_STEPS) optimizer steps.
# 12 rows x 3 epochs at batch 4 are 9 steps: on the demo task 9 steps at the default rates gave 0/12 (LoRA),
# 7/12 (IA3), 8/12 (prefix) held-out answers in the format, 30 steps 12, 12, 11 (see DEFAULT_LR).
MIN_STEPS = 30
SERVER_MAX_RANK = EngineConfig.max_lora_rank  # the default server refuses LoRA ranks above this


class TrainError(RuntimeError):
    """Training could not produce a servable adapter (bad base, bad options, refused result)."""


@dataclass
class TrainConfig:
    """Everything one training run needs. ``None`` fields take the per-kind defaults above."""

    kind: str
    data: Path
    out: Path
    base: Path | None = None              # dir, .gguf or tiny-llama-builtin; None = the server's default model
    cache_dir: Path | None = None         # the model cache (None: $ADAPTER_SERVER_CACHE or ~/.cache/adapter-server)
    quantization: str = "none"            # "nf4": QLoRA-style over a 4-bit base
    device: str = "auto"                  # auto: cuda if available, else cpu
    # LoRA
    rank: int = 8
    alpha: float | None = None            # None: 2 * rank
    dropout: float = 0.0
    lora_bias: bool = False               # lora/dora: lora_B gets a trained bias (PEFT lora_bias; not with dora)
    targets: tuple[str, ...] | None = None  # LoRA / IA3 target modules (short names)
    # IA3: which targets scale their input (feedforward_modules); None: down_proj if targeted (as PEFT)
    feedforward: tuple[str, ...] | None = None
    # prefix tuning, prompt tuning, P-tuning
    virtual_tokens: int = 16
    # "answers": prefix: the base's keys/values of the training answers; prompt: their token embeddings (ptuning:
    # PEFT's MLP encoder init either way); "random": PEFT's
    prefix_init: str = "answers"
    encoder_hidden_size: int | None = None  # ptuning: the MLP encoder's width (None: PEFT's, the hidden size)
    # bottleneck (houlsby, pfeiffer, parallel): None = the library's default of the kind
    reduction_factor: float | None = None  # width int(hidden // reduction_factor); library: 16, 16, 2
    activation: str | None = None         # relu, swish, gelu, tanh; library: swish, relu, relu
    # schedule
    epochs: float | None = None           # used when steps is None (then DEFAULT_EPOCHS)
    steps: int | None = None              # optimizer steps exactly; wins over epochs and min_steps
    min_steps: int = MIN_STEPS            # without steps: at least this many (0: epochs alone decide)
    lr: float | None = None
    schedule: str = "constant"
    warmup_steps: int | None = None       # None: DEFAULT_WARMUP of the kind (ptuning 5, others 0)
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

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else DEFAULT_WARMUP.get(self.kind, 0)


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


def plan_steps(num_rows: int, batch_size: int, *, epochs: float | None = None, steps: int | None = None,
               min_steps: int = MIN_STEPS) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) by the step rule.

    ``steps`` given: exactly that. Otherwise ``max(ceil(epochs * ceil(num_rows / batch_size)), min_steps)``
    with ``epochs`` defaulting to :data:`DEFAULT_EPOCHS`: 12 rows, 3 epochs, batch 4 -> 30 steps (10 epochs),
    not 9; 1,000 rows -> 750 steps (3 epochs), the rule does not apply.
    """
    if batch_size <= 0:
        raise TrainError("--batch-size must be positive")
    if num_rows <= 0:
        raise TrainError("no training rows")
    per_epoch = math.ceil(num_rows / batch_size)
    if steps is not None:
        if steps <= 0:
            raise TrainError("--steps must be positive")
        return steps, per_epoch
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if epochs <= 0:
        raise TrainError("--epochs must be positive")
    if min_steps < 0:
        raise TrainError("--min-steps must be 0 or more")
    by_epochs = max(1, math.ceil(epochs * per_epoch))
    return max(by_epochs, min_steps), per_epoch


def check_rank(config: TrainConfig) -> None:
    """Refuse a non-positive rank; warn, before any training, about a rank the default server refuses."""
    if config.kind not in LORA_KINDS:
        return
    if config.rank <= 0:
        raise TrainError("--rank must be positive")
    if config.rank > SERVER_MAX_RANK:
        log.warning("--rank %d is above %d, the largest LoRA rank a default adapter-server accepts: uploading this "
                    "adapter is refused unless the server runs with --max-lora-rank %d or more",
                    config.rank, SERVER_MAX_RANK, config.rank)
