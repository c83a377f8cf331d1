"""The minimal HTTP surface through a real server: /health and non-streaming /v1/completions."""
import httpx
import openai
import pytest

from server.config import EngineConfig
from server.engine.factory import build_engine
from server.api.app import create_app
from tests.server_harness import LiveServer


@pytest.fixture(scope="module")
def live(builtin_model_dir):
    engine = build_engine(EngineConfig(model=str(builtin_model_dir), max_batch=4, max_seq_len=256, max_waiting=8))
    with LiveServer(create_app(engine)) as server:
        yield server


def test_health(live):
    body = httpx.get(f"{live.url}/health").json()
    assert body["status"] == "ok" and body["model"] == "tiny-llama-builtin"


def test_completion_with_openai_client(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    first = client.completions.create(model="tiny-llama-builtin", prompt="Hello", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    again = client.completions.create(model="tiny-llama-builtin", prompt="Hello", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert first.choices[0].text == again.choices[0].text
    assert first.usage.completion_tokens == 8 and first.usage.prompt_tokens == 6  # bos + 5 bytes
    assert first.choices[0].finish_reason == "length"
    batch = client.completions.create(model="tiny-llama-builtin", prompt=["Hello", "Bye"], max_tokens=3, n=2,
                                      temperature=0, logprobs=2)
    assert len(batch.choices) == 4 and batch.choices[0].text == batch.choices[1].text
    assert len(batch.choices[0].logprobs.token_logprobs) <= 3


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**6}, "context"),
    ({"prompt": "x" * 300}, "context"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
])
def test_bad_requests_are_400_in_openai_shape(live, body, fragment):
    response = httpx.post(f"{live.url}/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_is_400(live):
    response = httpx.post(f"{live.url}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
