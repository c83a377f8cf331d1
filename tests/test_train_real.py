"""The trainer on the real default model (SmolLM2-135M-Instruct), the step rule and the server's limits.

The learning test trains one IA3 adapter on the demo task (adapters/demo_data: answer in a short
all-caps shout ending with "!") for 12 steps at 3e-2 (the default 1e-2 needs the rule's 30) on one
thread, and checks that the held-out loss drops and that greedy answers to held-out questions take
the trained format, which the base never does. Measured here (2 cores shared with other jobs): IA3
at 3e-2 for 12 steps answered 12 of 12 held-out questions in the format (LoRA at 3e-3: 12 of 12, at
twice the time per step); ~2 s a step; the model's conversion runs once per session (~30 s, shared
with tests/test_default_model.py). Prompt tuning and P-tuning train with the defaults (30 steps; 20 gave 9 and 7
of 12) and are served by an Engine on the default model: ~46 s each here (41 s of it the training loop).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from adapters.demo import HELDOUT, TRAIN, follows_format, questions
from adapters.train import MIN_STEPS, SERVER_MAX_RANK, TrainConfig, TrainError, plan_steps, train_adapter
from adapters.train_config import LINEAR_TARGETS, check_rank
from server.config import EngineConfig
from server.model.adapter_layers import TARGET_MODULES

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning",
                                        "ignore:.*torch.jit.script_method:DeprecationWarning")


# ------------------------------------------------------------------------------------------ the step rule


@pytest.mark.parametrize("rows, batch, epochs, steps, min_steps, expect", [
    (12, 4, None, None, MIN_STEPS, (30, 3)),      # 3 epochs would be 9 steps: the minimum wins (10 epochs)
    (24, 4, None, None, MIN_STEPS, (30, 6)),      # the demo: 18 by epochs -> 30 (5 epochs)
    (12, 4, 3, None, 0, (9, 3)),                  # --min-steps 0: epochs alone
    (1000, 4, None, None, MIN_STEPS, (750, 250)),  # big data: the rule does not apply
    (40, 4, None, None, MIN_STEPS, (30, 10)),     # exactly the minimum
    (13, 4, 2.5, None, MIN_STEPS, (30, 4)),
    (13, 4, 10, None, MIN_STEPS, (40, 4)),        # more epochs than the minimum asks
    (1, 4, 0.1, None, 0, (1, 1)),                 # at least one step
    (12, 4, None, 5, MIN_STEPS, (5, 3)),          # --steps is exact
    (12, 4, 3, 100, MIN_STEPS, (100, 3)),
])
def test_min_steps_rule(rows, batch, epochs, steps, min_steps, expect):
    assert plan_steps(rows, batch, epochs=epochs, steps=steps, min_steps=min_steps) == expect


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(steps=0), "--steps"), (dict(epochs=0), "--epochs"), (dict(min_steps=-1), "--min-steps")])
def test_min_steps_rule_refuses_nonsense(kwargs, fragment):
    with pytest.raises(TrainError, match=fragment):
        plan_steps(12, 4, **kwargs)
    with pytest.raises(TrainError, match="--batch-size"):
        plan_steps(12, 0)


# ------------------------------------------------------------------------------------------ one source


def test_limits_and_names_come_from_the_server():
    assert SERVER_MAX_RANK == EngineConfig().max_lora_rank == 64
    assert LINEAR_TARGETS is TARGET_MODULES


def test_a_rank_the_default_server_refuses_is_warned_before_training(caplog):
    def warnings_for(rank: int, kind: str = "lora") -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="adapters.train"):
            check_rank(TrainConfig(kind=kind, data=Path("x"), out=Path("y"), rank=rank))
        return [r.getMessage() for r in caplog.records]

    assert warnings_for(SERVER_MAX_RANK) == [] and warnings_for(8) == [] and warnings_for(128, "ia3") == []
    [message] = warnings_for(128)
    assert "--rank 128 is above 64" in message and "--max-lora-rank 128" in message
    with pytest.raises(TrainError, match="--rank must be positive"):
        check_rank(TrainConfig(kind="lora", data=Path("x"), out=Path("y"), rank=0))


def test_rank_warning_comes_from_a_real_run_and_the_adapter_is_still_written(tmp_path, builtin_model_dir, caplog):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "cat", "completion": "meow!"}) + "\n")
    rank = 2 * SERVER_MAX_RANK  # above what the default server accepts
    config = TrainConfig(kind="lora", data=data, out=tmp_path / f"r{rank}", base=builtin_model_dir, rank=rank,
                         steps=1, eval_fraction=0, progress=False, threads=1, device="cpu")
    with caplog.at_level(logging.WARNING, logger="adapters.train"):
        result = train_adapter(config)
    assert any(f"--max-lora-rank {rank}" in r.getMessage() for r in caplog.records)
    assert json.loads((result.out / "adapter_config.json").read_text())["r"] == rank


# ------------------------------------------------------------------------------------------ the real model


@pytest.fixture
def one_thread():
    """Generation on one thread too: two OpenMP threads stall each other on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def default_model():
    from server.model.default_model import DefaultModelMissing, ensure_default_model

    try:
        return ensure_default_model()  # conftest points the cache at a temp dir
    except DefaultModelMissing as exc:
        pytest.skip(str(exc))


def greedy_chat(model, tokenizer, question: str, max_new_tokens: int = 12) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# Trained behaviour is judged on all 12 held-out questions, by a share, not by every answer: greedy text near a
# decision boundary flips with the CPU's rounding. Measured with the trainer's defaults, 12 held-out questions
# answered as a shout, seeds 0/1/2: P-tuning 12/12/12 on Intel model 207 and 10/11/11 on AMD Zen 4 (2026-12-02);
# prompt tuning 12 and 11 (seeds 0, 1) on Intel. The base model answers none of them so.
MIN_TAUGHT = 8


def assert_taught(asked, tuned, base) -> None:
    """At least MIN_TAUGHT of the held-out questions answered in the trained format, none by the base."""
    taught = [q for q in asked if follows_format(tuned(q))]
    assert len(taught) >= MIN_TAUGHT, [(q, tuned(q)) for q in asked if q not in taught]
    assert not any(follows_format(base(q)) for q in asked), [(q, base(q)) for q in asked if follows_format(base(q))]


def test_ia3_on_the_default_model_learns_the_demo_format(default_model, tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = tmp_path / "held.jsonl"
    held.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:4]))
    result = train_adapter(TrainConfig(kind="ia3", data=TRAIN, eval_data=held, out=tmp_path / "ia3", steps=12,
                                       lr=3e-2, progress=False, threads=1, device="cpu"))
    print(f"\nia3 on {result.base}: {result.seconds:.1f} s for {result.steps} steps, train loss "
          f"{result.train_loss_start:.2f} -> {result.train_loss_end:.2f}, held-out {result.eval_loss_start:.2f} -> "
          f"{result.eval_loss_end:.2f}")
    assert result.base == "SmolLM2-135M-Instruct" and result.steps == 12
    assert result.eval_loss_end < 0.75 * result.eval_loss_start
    assert result.train_loss_end < 0.5 * result.train_loss_start

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model), result.out).eval()
    asked = questions(HELDOUT)
    tuned = dict(zip(asked, (greedy_chat(model, tokenizer, q) for q in asked)))
    with model.disable_adapter():
        base = dict(zip(asked, (greedy_chat(model, tokenizer, q) for q in asked)))
    print(dict(zip(asked, zip(base.values(), tuned.values()))))
    assert_taught(asked, tuned.__getitem__, base.__getitem__)


def test_qlora_style_nf4_on_the_default_model(default_model, tmp_path):
    """Every input size of SmolLM2 (576, 1536) is a multiple of bitsandbytes' CPU block (64): nf4 trains."""
    held = tmp_path / "held.jsonl"
    held.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:4]))
    result = train_adapter(TrainConfig(kind="lora", data=TRAIN, eval_data=held, out=tmp_path / "qlora", steps=4,
                                       lr=3e-3, quantization="nf4", progress=False, threads=1, device="cpu"))
    print(f"\nnf4 lora: {result.seconds:.1f} s for 4 steps, held-out {result.eval_loss_start:.2f} -> "
          f"{result.eval_loss_end:.2f}")
    assert result.eval_loss_end < 0.8 * result.eval_loss_start
    assert sorted(p.name for p in result.out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("kind", ["prompt", "ptuning"])
def test_prompt_kinds_on_the_default_model_are_served_as_taught(kind, default_model, tmp_path, one_thread):
    """Prompt tuning / P-tuning trained with the trainer's defaults on the demo task (30 steps: 20 were not enough,
    see DEFAULT_LR), put in a store and served by an Engine on the default model in one batch with base rows: the
    adapter's greedy answers to held-out questions are shouts, the base's are not."""
    from transformers import AutoTokenizer

    from adapters.store import AdapterStore
    from server.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams
    from server.model.loader import load_model

    held = tmp_path / "held.jsonl"
    held.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:4]))
    result = train_adapter(TrainConfig(kind=kind, data=TRAIN, eval_data=held, out=tmp_path / kind, progress=False,
                                       threads=1, device="cpu"))
    print(f"\n{kind}: {result.seconds:.1f} s for {result.steps} steps, train loss {result.train_loss_start:.2f} -> "
          f"{result.train_loss_end:.2f}, held-out {result.eval_loss_start:.2f} -> {result.eval_loss_end:.2f}")
    assert result.steps == MIN_STEPS and result.eval_loss_end < 0.8 * result.eval_loss_start
    store = AdapterStore(tmp_path / "store")
    store.add(kind, result.out)

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    engine = Engine(load_model(default_model, dtype=torch.float32),
                    EngineConfig(max_batch=24, max_seq_len=256, max_adapter_slots=2, merge_threshold=2.0), store=store)
    asked = questions(HELDOUT)
    requests = {}
    for adapter in (None, kind):
        for question in asked:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
            requests[adapter, question] = engine.make_request(ids, SamplingParams(max_tokens=12, temperature=0.0),
                                                              adapter=adapter)
    engine.generate(list(requests.values()))
    answers = {key: tokenizer.decode(r.output_token_ids, skip_special_tokens=True) for key, r in requests.items()}
    print(answers)
    assert_taught(asked, lambda q: answers[kind, q], lambda q: answers[None, q])
