"""POST /tokenize and /detokenize (vLLM's shapes) and max_model_len in /v1/models, through a real server on the
built-in model (byte-level: ids 0..255 are bytes, then <|bos|>=256, <|eos|>, <|pad|>, <|system|>, <|user|>,
<|assistant|>=261, <|end|>=262)."""
import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.engine.factory import build_engine
from tests.api_support import ENGINE_DEFAULTS, engine_config, serve, with_config

BASE = "tiny-llama-builtin"
BOS, USER, ASSISTANT, END = 256, 260, 261, 262
MAX_LEN = ENGINE_DEFAULTS["max_seq_len"]
HELLO = list(b"Hello")
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    with serve(builtin_model_dir, tmp_path_factory.mktemp("adapters")) as (server, engine):
        yield server


def post(live, path: str, body) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", json=body)


def tokenize(live, **body) -> dict:
    response = post(live, "/tokenize", body)
    assert response.status_code == 200, response.text
    return response.json()


# body -> the tokens /tokenize returns
TOKENIZE_CASES = [
    ({"prompt": "Hello"}, [BOS, *HELLO]),  # a prompt gets bos by default (vLLM)
    ({"prompt": "Hello", "add_special_tokens": False}, HELLO),
    ({"prompt": "Hello", "model": BASE}, [BOS, *HELLO]),
    ({"prompt": "é✓"}, [BOS, *"é✓".encode()]),
    ({"messages": CHAT}, [BOS, USER, *b"Hi", END, ASSISTANT]),  # the template writes bos; generation prompt
    ({"messages": CHAT, "add_generation_prompt": False}, [BOS, USER, *b"Hi", END]),
    ({"messages": CHAT, "add_special_tokens": True}, [BOS, BOS, USER, *b"Hi", END, ASSISTANT]),
    ({"messages": CHAT + [{"role": "assistant", "content": "Yo"}], "continue_final_message": True},
     [BOS, USER, *b"Hi", END, ASSISTANT, *b"Yo"]),
    ({"messages": [{"role": "developer", "content": [{"type": "text", "text": "S"}]}]},
     [BOS, 259, *b"S", END, ASSISTANT]),  # the same rendering as chat completions: developer -> system
]


@pytest.mark.parametrize("body, tokens", TOKENIZE_CASES)
def test_tokenize(live, body, tokens):
    assert tokenize(live, **body) == {"tokens": tokens, "count": len(tokens), "max_model_len": MAX_LEN,
                                      "token_strs": None}


def test_tokenize_counts_what_chat_completions_feeds_the_model(live):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = post(live, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert tokenize(live, messages=messages)["count"] == chat["usage"]["prompt_tokens"]
    completion = post(live, "/v1/completions", {"prompt": "Hello there", "max_tokens": 1}).json()
    assert tokenize(live, prompt="Hello there")["count"] == completion["usage"]["prompt_tokens"]


def test_token_strs(live):
    body = tokenize(live, prompt="Hi", return_token_strs=True)
    assert body["token_strs"] == ["<|bos|>", "H", "i"]


@pytest.mark.parametrize("text", ["Hello", "é✓ and spaces  ", "<|user|>x"])
def test_detokenize_inverts_tokenize(live, text):
    for special in (True, False):
        tokens = tokenize(live, prompt=text, add_special_tokens=special)["tokens"]
        response = post(live, "/detokenize", {"tokens": tokens, "model": BASE})
        assert response.status_code == 200, response.text
        assert response.json() == {"prompt": ("<|bos|>" if special else "") + text}  # special tokens kept (vLLM)


def test_models_carry_max_model_len(live):
    models = httpx.get(f"{live.url}/v1/models").json()["data"]
    assert models and all(m["max_model_len"] == MAX_LEN for m in models)
    assert httpx.get(f"{live.url}/v1/models/{BASE}").json()["max_model_len"] == MAX_LEN


# path, body, status, a fragment of the message
BAD = [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": CHAT}, 400, "not both"),
    ("/tokenize", {"prompt": ""}, 400, "empty"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": ["a"]}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": "hi"}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": CHAT, "add_generation_prompt": True, "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/tokenize", {"messages": CHAT, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "nope"),
    ("/tokenize", [1, 2], 400, "JSON object"),
    ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": []}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "out of range"),
    ("/detokenize", {"tokens": [263]}, 400, "out of range"),
    ("/detokenize", {"tokens": [10**30]}, 400, "out of range"),
    ("/detokenize", {"tokens": ["72"]}, 400, "tokens"),
    ("/detokenize", {"tokens": [7.5]}, 400, "tokens"),
    ("/detokenize", {"tokens": [True]}, 400, "tokens"),
    ("/detokenize", {"tokens": "Hello"}, 400, "tokens"),
    ("/detokenize", {"tokens": [72], "adapter": "nope"}, 404, "nope"),
]


@pytest.mark.parametrize("path, body, status, fragment", BAD)
def test_bad_input_is_an_openai_error(live, path, body, status, fragment):
    response = post(live, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


def test_tokenizer_routes_need_an_inference_key(builtin_model_dir, tmp_path):
    engine = build_engine(engine_config(builtin_model_dir, tmp_path))
    app = create_app(engine, with_config(api_keys=("inf",), admin_keys=("adm",)))
    client = TestClient(app)  # no lifespan: tokenizing needs no engine thread
    for path, body in (("/tokenize", {"prompt": "Hi"}), ("/detokenize", {"tokens": [72, 105]})):
        assert client.post(path, json=body).status_code == 401
        assert client.post(path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        for key in ("inf", "adm"):
            assert client.post(path, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
