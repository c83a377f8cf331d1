"""lm-evaluation-harness against the server: its ``local-completions`` model (echo + logprobs prompt scoring,
no extra flags) gives the same per-sample loglikelihoods (fp32, within 1e-4), the same greedy flags and the
same accuracy as its own ``hf`` model on the same checkpoint, for the base and for a LoRA adapter chosen by
``model`` (``hf`` with ``peft=``). The task is a multiple-choice one defined here (no hub: the documents are a
local JSON file, HF_DATASETS_OFFLINE)."""
import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the eval extra: pip install -e '.[eval]'")

from lm_eval.tasks import TaskManager  # noqa: E402

from tests.api_support import adapter_files, serve, upload  # noqa: E402
from tests.peft_adapters import make_lora  # noqa: E402

TASK = "adapter_server_tiny_mc"
TOLERANCE = 1e-4
DOCS = [
    ("The sky on a clear day is", [" blue", " green", " loud", " square"], 0),
    ("Two plus two equals", [" four", " five", " seven"], 0),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " north"], 0),
    ("A cat says", [" meow", " moo", " quack", " hello there"], 0),
    ("The opposite of hot is", [" warm", " cold", " tall"], 1),
    ("Bees make", [" milk", " honey", " bread", " paper"], 1),
    ("The capital of France is", [" Rome", " Berlin", " Paris"], 2),
    ("Monday comes before", [" Sunday", " Friday", " Tuesday"], 2),
    ("Fish live in", [" trees", " deserts", " water", " clouds"], 2),
    ("Ice is a solid form of", [" air", " fire", " stone", " water"], 3),
]
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory) -> TaskManager:
    root = tmp_path_factory.mktemp("lm-eval-task")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in DOCS))
    (root / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, cache=root / "hf-datasets"))
    return TaskManager(include_path=str(root), include_defaults=False)


@pytest.fixture(scope="module")
def lora(builtin_model_dir, tmp_path_factory):
    return make_lora(builtin_model_dir, tmp_path_factory.mktemp("lm-eval-lora") / "lora", seed=5, r=4)


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory, lora):
    with serve(builtin_model_dir, tmp_path_factory.mktemp("store")) as (server, engine):
        assert upload(server.url, "mc-lora", list(adapter_files(lora).items())).status_code == 201
        yield server, engine


def evaluate(task_manager, model: str, model_args: str):
    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=task_manager,
                                     batch_size=4, device="cpu", log_samples=True, bootstrap_iters=0)
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    scores = [[tuple(r[0]) for r in s["resps"]] for s in samples]  # per doc, per choice: (loglikelihood, greedy)
    return result["results"][TASK]["acc,none"], scores


def served_args(live, builtin_model_dir, model: str, extra: str = "") -> str:
    # what a user passes: the served model name, the endpoint and the tokenizer; nothing server-specific
    return f"model={model},base_url={live[0].url}/v1/completions,tokenizer={builtin_model_dir}" + extra


def assert_same(served, reference) -> None:
    assert [len(doc) for doc in served] == [len(choices) for _, choices, _ in DOCS]
    for ours, theirs in zip(served, reference):
        for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, theirs):
            assert abs(ll - ll_ref) < TOLERANCE, (ours, theirs)
            assert greedy == greedy_ref, (ours, theirs)


# lm-eval's API models do not add the tokenizer's BOS by default (add_bos_token=False), its hf model does
# (the tokenizer's default): the oracle is told to score the same tokens.
HF_SAME_TOKENS = ",add_bos_token=False"


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
def test_local_completions_equal_lm_evals_hf_model(live, builtin_model_dir, task_manager, lora, adapter):
    model = "mc-lora" if adapter else live[1].model_name
    served_acc, served = evaluate(task_manager, "local-completions", served_args(live, builtin_model_dir, model))
    hf_args = f"pretrained={builtin_model_dir},dtype=float32{HF_SAME_TOKENS}" + (f",peft={lora}" if adapter else "")
    hf_acc, reference = evaluate(task_manager, "hf", hf_args)
    assert_same(served, reference)
    assert served_acc == hf_acc
    if adapter:  # the adapter was applied: its scores are not the base's
        _, base = evaluate(task_manager, "local-completions", served_args(live, builtin_model_dir, live[1].model_name))
        assert max(abs(a[0] - b[0]) for x, y in zip(served, base) for a, b in zip(x, y)) > 0.01


def test_with_bos_equal_lm_evals_hf_model_default(live, builtin_model_dir, task_manager):
    """add_bos_token=True on the client: every prompt starts with BOS (scored null), as hf scores by default."""
    served_acc, served = evaluate(task_manager, "local-completions",
                                  served_args(live, builtin_model_dir, live[1].model_name, ",add_bos_token=True"))
    hf_acc, reference = evaluate(task_manager, "hf", f"pretrained={builtin_model_dir},dtype=float32")
    assert_same(served, reference)
    assert served_acc == hf_acc
