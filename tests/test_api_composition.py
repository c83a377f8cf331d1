"""Composition over HTTP: the ``adapters`` / ``adapter_combination`` fields through the openai client, equal to the
engine's own composition (held to PEFT in tests/test_composition_golden.py), and every bad shape a clear error."""
import json

import httpx
import openai
import pytest

import torch
from transformers import AutoTokenizer

from adapters.composition import Composition, Member
from tests.api_support import adapter_files, serve, upload
from tests.peft_adapters import make_ia3, make_lora
from tests.test_composition_golden import peft_oracle

BASE = "tiny-llama-builtin"
PROMPT = "Hello there"


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("composition-api")
    with serve(builtin_model_dir, root / "store", max_seq_len=256, max_lora_rank=16) as (server, engine):
        server.paths = {"la": make_lora(builtin_model_dir, root / "la", seed=1),
                        "lb": make_lora(builtin_model_dir, root / "lb", seed=2, targets=("q_proj", "v_proj", "up_proj")),
                        "lr8": make_lora(builtin_model_dir, root / "lr8", seed=3, r=4),
                        "scale": make_ia3(builtin_model_dir, root / "ia3", seed=4)}
        for name, path in server.paths.items():
            response = upload(server.url, name, list(adapter_files(path).items()))
            assert response.status_code == 201, response.text
        server.base = builtin_model_dir
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def complete(client, **extra) -> str:
    return client.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True, **extra}).choices[0].text


def scores(client, **extra) -> tuple[float, ...]:
    """The greedy tokens' logprobs (the random tiny model's texts are mostly U+FFFD; these tell models apart)."""
    choice = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                       extra_body={"ignore_eos": True, **extra}).choices[0]
    return tuple(round(v, 4) for v in choice.logprobs.token_logprobs)


def peft_text(live, composition: Composition) -> str:
    """PEFT's greedy text for the composition (tests.test_composition_golden.peft_oracle)."""
    tokenizer = AutoTokenizer.from_pretrained(live.base)
    model = peft_oracle(live.base, live.paths, composition)
    model.generation_config.eos_token_id = None
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_weighted_loras_and_families_compose_over_http(live, client):
    cat = complete(client, adapters={"la": 0.7, "lb": 0.3})
    assert cat == peft_text(live, Composition((Member("la", 0.7), Member("lb", 0.3)), "cat"))
    linear = complete(client, adapters={"la": 0.7, "lb": 0.3}, adapter_combination="linear")
    assert linear == peft_text(live, Composition((Member("la", 0.7), Member("lb", 0.3)), "linear"))
    family = complete(client, adapters=["la", "scale"])
    assert family == peft_text(live, Composition((Member("la"), Member("scale"))))
    outputs = {scores(client), scores(client, adapter="la"), scores(client, adapters={"la": 0.7, "lb": 0.3}),
               scores(client, adapters=["la", "scale"])}
    assert len(outputs) == 4, outputs  # each composition is its own model
    assert scores(client, adapters=["la"]) == scores(client, adapter="la")  # one member: that adapter


def test_chat_streaming_and_metrics_with_a_composition(live, client):
    messages = [{"role": "user", "content": "hi"}]
    extra = {"ignore_eos": True, "adapters": {"la": 0.5, "lr8": 0.5}}
    whole = client.chat.completions.create(model=BASE, messages=messages, max_tokens=6, temperature=0,
                                           extra_body=extra)
    assert whole.model == BASE
    chunks = client.chat.completions.create(model=BASE, messages=messages, max_tokens=6, temperature=0,
                                            extra_body=extra, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'adapter="la*0.5+lr8*0.5[cat]"' in metrics


BAD = [
    ({"adapters": {"la": 0.5}, "adapter": "lb"}, 400, "adapters field alone"),
    ({"adapters": ["la", "la"]}, 400, "twice"),
    ({"adapters": {"la": 0.0}}, 400, "nonzero"),
    ({"adapters": {"la": 11.0}}, 400, "in [-10, 10]"),
    ({"adapters": {"la": float("nan")}}, 400, "nonzero number"),
    ({"adapters": []}, 400, "names no adapter"),
    ({"adapters": ["la", "nope"]}, 404, "'nope' not found"),
    ({"adapters": {"la": 1.0, "scale": 2.0}}, 400, "weights apply to LoRA adapters only"),
    ({"adapters": {"la": 1.0, "lr8": 1.0}, "adapter_combination": "linear"}, 400, "one rank"),
    ({"adapters": {"la": 1.0, "lb": 1.0, "lr8": 1.0}}, 400, "--max-lora-rank"),
    ({"adapters": {"la": 1.0}, "adapter_combination": "svd"}, 400, "adapter_combination"),
    ({"adapter_combination": "cat"}, 400, "adapters field, which is not set"),
    ({"adapters": {"la": "0.5"}}, 400, "a list of adapter names or an object mapping"),
    ({"adapters": "la"}, 400, "a list of adapter names or an object mapping"),
    ({"adapters": [f"x{i}" for i in range(9)]}, 400, "at most 8"),
]


@pytest.mark.parametrize("extra,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_compositions_get_clear_errors(live, extra, status, message):
    def post(path: str, body: dict) -> httpx.Response:  # json.dumps writes NaN, as a careless client may
        return httpx.post(f"{live.url}{path}", content=json.dumps(body), headers={"content-type": "application/json"})

    response = post("/v1/completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 2, **extra})
    assert response.status_code == status, response.text
    assert message in response.text, response.text
    response = post("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 2, **extra})
    assert response.status_code == status, response.text
