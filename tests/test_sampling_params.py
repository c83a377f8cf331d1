"""Penalties, min_p, min_tokens and logit_bias: each against a reference written here from its definition,
alone and in batches mixing rows with different settings; validation; the API passing them through; and
the engine applying them step by step (checked against the reference on the logits it sampled from)."""
import math

import httpx
import pytest
import torch

import server.engine.runner as runner_module
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, RequestError, SamplingParams
from server.engine.sampling import RowSampling, _processed_probs, adjusted_logits, make_generator, sample
from server.model.loader import load_model
from tests.api_support import serve

V = 16
EOS = frozenset({15})


def reference(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int], eos=EOS) -> list[float]:
    """Steps 1-4 of server.engine.sampling, one row, straight from the definitions."""
    x = list(logits)
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = -math.inf
    for t, bias in p.logit_bias:
        x[t] += bias
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


def row(prompt, output, eos=EOS, **params) -> RowSampling:
    request = Request(list(prompt), SamplingParams(**params))
    request.output_token_ids = list(output)
    return RowSampling(request.params, make_generator(0), request=request, eos_token_ids=eos)


# name -> (sampling params, prompt, output so far)
ROWS = {
    "plain": ({}, [1, 2], [3]),
    "repetition": ({"repetition_penalty": 1.5}, [1, 2, 3], [3, 4]),
    "repetition-below-1": ({"repetition_penalty": 0.7}, [5], [5, 6]),
    "frequency": ({"frequency_penalty": 0.5}, [7], [7, 7, 7, 8]),
    "presence-negative": ({"presence_penalty": -1.0}, [], [9, 9, 10]),
    "all-penalties": ({"frequency_penalty": 1.0, "presence_penalty": 0.5, "repetition_penalty": 1.3}, [0, 11],
                      [11, 11, 12]),
    "logit-bias": ({"logit_bias": ((2, 5.0), (3, -100.0))}, [2], []),
    "min-tokens-active": ({"min_tokens": 3, "stop_token_ids": (4,)}, [1], [1]),
    "min-tokens-reached": ({"min_tokens": 2, "stop_token_ids": (4,)}, [1], [1, 2]),
    "min-tokens-ignore-eos": ({"min_tokens": 5, "stop_token_ids": (6,), "ignore_eos": True}, [1], []),
    "order": ({"logit_bias": ((5, 3.0), (4, 2.0)), "repetition_penalty": 1.7, "frequency_penalty": 0.4,
               "min_tokens": 4, "stop_token_ids": (4,)}, [5], [5, 5, 8]),
}


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def expected(logits: torch.Tensor, names: list[str]) -> torch.Tensor:
    return torch.tensor([reference(logits[i].tolist(), SamplingParams(**ROWS[n][0]), ROWS[n][1], ROWS[n][2])
                         for i, n in enumerate(names)])


def rows_for(names: list[str], **extra) -> list[RowSampling]:
    return [row(ROWS[n][1], ROWS[n][2], **{**ROWS[n][0], **extra}) for n in names]


@pytest.mark.parametrize("name", list(ROWS))
def test_each_adjustment_alone(name):
    logits = logits_for(1)
    torch.testing.assert_close(adjusted_logits(logits, rows_for([name])), expected(logits, [name]))


MIXES = [list(ROWS), list(reversed(ROWS)), ["plain", "order", "plain", "frequency", "plain"],
         ["min-tokens-active", "min-tokens-reached", "logit-bias", "repetition", "repetition-below-1"]]


@pytest.mark.parametrize("names", MIXES)
def test_mixed_batches_apply_each_rows_own_settings(names):
    logits = logits_for(len(names), seed=len(names))
    before = logits.clone()
    torch.testing.assert_close(adjusted_logits(logits, rows_for(names)), expected(logits, names))
    assert torch.equal(logits, before)  # the caller's logits (raw logprobs come from them) are untouched


@pytest.mark.parametrize("names", MIXES)
def test_greedy_rows_take_the_argmax_of_the_adjusted_logits(names):
    logits = logits_for(len(names), seed=7)
    tokens, _ = sample(logits, rows_for(names, temperature=0.0))
    assert tokens == expected(logits, names).argmax(dim=-1).tolist()


def test_rows_that_ask_for_nothing_cost_nothing():
    logits = logits_for(3)
    assert adjusted_logits(logits, rows_for(["plain"] * 3)) is logits  # no copy, no history read
    mixed = adjusted_logits(logits, rows_for(["plain", "order", "plain"]))
    assert torch.equal(mixed[[0, 2]], logits[[0, 2]])


def test_min_tokens_blocks_eos_and_stop_ids_even_as_the_argmax():
    logits = torch.zeros(3, V)
    logits[:, 15], logits[:, 4], logits[:, 9] = 10.0, 9.0, 1.0  # EOS, then the stop id, then a plain token
    rows = [row([1], [], min_tokens=2, stop_token_ids=(4,), temperature=0.0),
            row([1], [2, 3], min_tokens=2, stop_token_ids=(4,), temperature=0.0),
            row([1], [], min_tokens=2, stop_token_ids=(4,), ignore_eos=True, temperature=0.0)]
    assert sample(logits, rows)[0] == [9, 15, 15]


def min_p_reference(logits: list[float], temperature: float, min_p: float) -> list[float]:
    probs = torch.softmax(torch.tensor(logits) / temperature, dim=-1)
    kept = torch.where(probs >= min_p * probs.max(), probs, torch.zeros(()))
    return (kept / kept.sum()).tolist()


MIN_P = [(1.0, 0.0), (1.0, 0.1), (0.5, 0.3), (1.5, 0.05), (1.0, 1.0)]  # (temperature, min_p) per row


def test_min_p_distribution_per_row():
    logits = logits_for(len(MIN_P), seed=3)
    rows = [row([], [], temperature=t, min_p=m) for t, m in MIN_P]
    probs, ids = _processed_probs(logits, rows)
    full = torch.zeros_like(probs).scatter_(1, ids, probs)
    want = torch.tensor([min_p_reference(logits[i].tolist(), t, m) for i, (t, m) in enumerate(MIN_P)])
    torch.testing.assert_close(full, want)


def test_min_p_sampling_never_draws_a_dropped_token():
    logits = logits_for(1, seed=5).repeat(len(MIN_P), 1)
    allowed = [{t for t, p in enumerate(min_p_reference(logits[0].tolist(), t, m)) if p > 0} for t, m in MIN_P]
    drawn = [set() for _ in MIN_P]
    for seed in range(200):
        rows = [row([], [], temperature=t, min_p=m) for t, m in MIN_P]
        for r in rows:
            r.generator = make_generator(seed)
        for i, token in enumerate(sample(logits, rows)[0]):
            drawn[i].add(token)
    assert all(d <= a for d, a in zip(drawn, allowed))
    assert len(drawn[0]) > len(allowed[2])  # the unfiltered row does draw what min_p drops
    assert drawn[4] == allowed[4] == {int(logits[0].argmax())}


BAD_PARAMS = [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
]


@pytest.mark.parametrize("params, fragment", BAD_PARAMS)
def test_validation(params, fragment):
    with pytest.raises(RequestError, match=fragment):
        SamplingParams(**params).validate()


def test_logit_bias_must_name_vocabulary_tokens():
    SamplingParams(logit_bias=((262, 1.0),)).check_vocab(263)
    with pytest.raises(RequestError, match="vocabulary"):
        SamplingParams(logit_bias=((263, 1.0),)).check_vocab(263)


# ---------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    with serve(builtin_model_dir, tmp_path_factory.mktemp("adapters")) as (server, engine):
        yield server


ALL_FIELDS = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "min_p": 0.05,
              "min_tokens": 2, "logit_bias": {"72": 1.5}, "max_tokens": 4}


def test_api_accepts_and_passes_the_fields(live):
    completion = httpx.post(f"{live.url}/v1/completions", json={"prompt": "Hi", **ALL_FIELDS})
    assert completion.status_code == 200, completion.text
    chat = httpx.post(f"{live.url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "Hi"}], **ALL_FIELDS})
    assert chat.status_code == 200, chat.text
    # logit_bias reaches the sampler: +100 on "H" (72) makes a greedy row say only that
    forced = {"temperature": 0, "max_tokens": 4, "ignore_eos": True, "logit_bias": {"72": 100}}
    text = httpx.post(f"{live.url}/v1/completions", json={"prompt": "Hi", **forced}).json()["choices"][0]["text"]
    assert text == "HHHH"
    chat = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                **forced}).json()
    assert chat["choices"][0]["message"]["content"] == "HHHH"


BAD_BODIES = [
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 2}, "min_p"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 1.5}, "min_tokens"),
    ({"min_tokens": 8, "max_tokens": 4}, "min_tokens"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "1"}}, "logit_bias"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "vocabulary"),
]


@pytest.mark.parametrize("body, fragment", BAD_BODIES)
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_api_refuses_bad_values_with_400(live, route, body, fragment):
    payload = {"prompt": "x"} if route == "completions" else {"messages": [{"role": "user", "content": "x"}]}
    if route == "chat" and "max_tokens" in body:
        body = {**body, "max_completion_tokens": body["max_tokens"]}
    response = httpx.post(f"{live.url}/v1/{'chat/' if route == 'chat' else ''}completions", json={**payload, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


# -------------------------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    return load_model(tiny_checkpoints["llama"], dtype=torch.float32)


ENGINE_ROWS = [  # greedy requests sharing batches: (prompt, extra params)
    ([5, 72, 101, 108], {"repetition_penalty": 1.8}),
    ([30, 31, 32, 33, 34], {"frequency_penalty": 1.5, "presence_penalty": 0.5}),
    ([9] * 7, {"min_tokens": 5, "stop_token_ids": (40,), "logit_bias": ((40, 30.0), (41, 2.0))}),
    ([100, 101, 102], {}),
    ([40, 41, 42], {"repetition_penalty": 0.8, "logit_bias": ((42, -5.0),), "frequency_penalty": -0.5}),
]


def test_engine_samples_each_step_from_the_reference(loaded, monkeypatch):
    """Every step of a mixed batch, every row: the engine's token is the argmax of the reference applied to the
    raw logits it sampled from, with that row's prompt and outputs so far; and min_tokens holds a stop id."""
    engine = Engine(loaded, EngineConfig(max_batch=3, max_seq_len=64))
    requests = [Request(p, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, **kw))
                for p, kw in ENGINE_ROWS]
    of_params = {id(r.params): r for r in requests}
    real_sample, steps = runner_module.sample, []

    def spy(logits, rows):
        histories = [(of_params[id(r.params)], list(of_params[id(r.params)].output_token_ids)) for r in rows]
        tokens, logprobs = real_sample(logits, rows)
        steps.append((logits.clone(), rows, histories, tokens))
        return tokens, logprobs

    monkeypatch.setattr(runner_module, "sample", spy)
    engine.generate(requests)
    assert all(r.request is not None for _, rows, _, _ in steps for r in rows)
    for logits, rows, histories, tokens in steps:
        for i, (request, output) in enumerate(histories):
            want = reference(logits[i].tolist(), request.params, request.prompt_token_ids, output,
                             eos=engine.eos_token_ids)
            assert tokens[i] == max(range(len(want)), key=want.__getitem__)
    assert len({len(rows) for _, rows, _, _ in steps}) > 1  # batches of different make-ups were sampled
    held = requests[2]
    assert held.output_token_ids[-1] == 40 and len(held.output_token_ids) == 6  # 5 held back, then the stop id
    assert 40 not in held.output_token_ids[:5]
