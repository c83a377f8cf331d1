"""Completions and chat completions through a real server, driven by the official openai client."""
import json

import httpx
import openai
import pytest

from tests.api_support import serve

BASE = "tiny-llama-builtin"


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    with serve(builtin_model_dir, tmp_path_factory.mktemp("adapters")) as (server, engine):
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def greedy(client, prompt="Hello", max_tokens=6, **extra):
    return client.completions.create(model=BASE, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True, **extra})


def sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of an SSE body, checking the framing on the way."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def test_completion_usage_and_finish_reason(client):
    first, again = greedy(client), greedy(client)
    assert first.choices[0].text == again.choices[0].text
    assert first.object == "text_completion" and first.model == BASE
    assert first.usage.prompt_tokens == 6 and first.usage.completion_tokens == 6 and first.usage.total_tokens == 12
    assert first.choices[0].finish_reason == "length"


def test_prompt_forms_n_and_seed(client, live):
    batch = client.completions.create(model=BASE, prompt=["Hello", "Bye"], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text
    tokens = client.completions.create(model=BASE, prompt=[256, 72, 101], max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert tokens.usage.prompt_tokens == 3
    seeded = [client.completions.create(model=BASE, prompt="Hi", max_tokens=8, seed=7, n=2,
                                        extra_body={"ignore_eos": True}) for _ in range(2)]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    single = client.completions.create(model=BASE, prompt="Hi", max_tokens=8, seed=7, extra_body={"ignore_eos": True})
    assert single.choices[0].text == seeded[0].choices[0].text
    user = client.completions.create(model=BASE, prompt="Hi", max_tokens=2, user="someone")
    assert user.choices[0].text is not None


def test_echo_stop_and_logprobs(client):
    plain = greedy(client, max_tokens=8).choices[0].text
    echoed = greedy(client, max_tokens=8, echo=True)
    assert echoed.choices[0].text == "Hello" + plain
    stop = plain[3:5]
    stopped = client.completions.create(model=BASE, prompt="Hello", max_tokens=8, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == plain[:plain.index(stop)]
    scored = client.completions.create(model=BASE, prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True})
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_streamed_completion_matches_and_reports_usage(client):
    expected = greedy(client, max_tokens=8).choices[0].text
    stream = client.completions.create(model=BASE, prompt="Hello", max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    assert all(c.object == "text_completion" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format(live):
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True, "n": 2, "ignore_eos": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"] == "length"]
    assert sorted(finished) == [0, 1]


def test_chat_completion_and_stream(client, live):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    reply = client.chat.completions.create(model=BASE, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    assert len(reply.choices[0].logprobs.content) == 6
    assert all(len(t.top_logprobs) <= 2 for t in reply.choices[0].logprobs.content)
    # <|bos|><|system|>Be brief.<|end|><|user|>Hi there<|end|><|assistant|>: 1+1+9+1+1+8+1+1
    assert reply.usage.prompt_tokens == 23
    stream = client.chat.completions.create(model=BASE, messages=messages, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == 23 and chunks[-1].usage.completion_tokens == 6
    with httpx.stream("POST", f"{live.url}/v1/chat/completions",
                      json={"messages": messages, "max_tokens": 2, "stream": True}) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant",
                                                                                       "content": ""}


def test_chat_content_parts_and_max_completion_tokens(client):
    reply = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3


def test_unknown_model_or_adapter_is_404_naming_it(client):
    with pytest.raises(openai.NotFoundError) as missing_model:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert "no-such-model" in missing_model.value.message
    with pytest.raises(openai.NotFoundError) as missing_adapter:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"adapter": "ghost"})
    assert "ghost" in missing_adapter.value.message
    assert missing_adapter.value.body["code"] == "adapter_not_found"


def test_models_lists_the_base(client):
    models = client.models.list().data
    assert models[0].id == BASE and models[0].kind == "base"
    assert client.models.retrieve(BASE).id == BASE


BAD_COMPLETIONS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**12}, "context"),
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "x" * 300}, "context"),
    ({"prompt": [10**9]}, "token ids"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 1000}, "n"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "frequency_penalty": 3.0}, "frequency_penalty"),
    ({"prompt": "x", "user": 5}, "user"),
    ({"max_tokens": 4}, "prompt"),
    ([1, 2], "JSON object"),
]


@pytest.mark.parametrize("body, fragment", BAD_COMPLETIONS)
def test_bad_completions_are_400_in_openai_shape(live, body, fragment):
    response = httpx.post(f"{live.url}/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": "hello"}, "messages"),
])
def test_bad_chat_requests_are_400(live, body, fragment):
    response = httpx.post(f"{live.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def test_malformed_json_is_400_and_the_server_keeps_serving(live, client):
    response = httpx.post(f"{live.url}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert httpx.get(f"{live.url}/v1/nothing-here").json()["error"]["type"] == "not_found_error"
    assert greedy(client, max_tokens=2).usage.completion_tokens == 2


def test_null_fields_mean_defaults(live):
    body = {"prompt": "Hi", "max_tokens": None, "temperature": None, "n": None, "stop": None, "stream": None,
            "logprobs": None, "seed": None}
    response = httpx.post(f"{live.url}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 16
