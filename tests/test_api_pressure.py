"""Under pressure: a full queue is 429, a client that goes away aborts its request at once, timeouts."""
import json

import httpx
import pytest

from tests.api_support import adapter_files, peft_lora, serve, upload, wait_until, with_config

LONG = 2000  # tokens: far more than a test waits for, so a request that ends early was aborted


def capture_requests(engine) -> list:
    """Record every engine request the API layer makes (to watch how each one ends)."""
    made = []
    original = engine.make_request

    def make_request(*args, **kwargs):
        request = original(*args, **kwargs)
        made.append(request)
        return request

    engine.make_request = make_request
    return made


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    config = with_config(request_timeout=None)
    with serve(builtin_model_dir, tmp_path_factory.mktemp("adapters"), config, max_batch=1, max_waiting=1,
               max_seq_len=2048) as (server, engine):
        server.engine, server.made = engine, capture_requests(engine)
        yield server


@pytest.fixture(scope="module")
def short_timeout(builtin_model_dir, tmp_path_factory):
    config = with_config(request_timeout=1.0)
    with serve(builtin_model_dir, tmp_path_factory.mktemp("adapters"), config, max_seq_len=2048) as (server, engine):
        server.engine, server.made = engine, capture_requests(engine)
        yield server


def long_body(**extra) -> dict:
    return {"prompt": "Hello", "max_tokens": LONG, "temperature": 0, "ignore_eos": True, **extra}


def first_event(lines) -> dict:
    """The first event from ``lines`` (keep that iterator referenced: dropping it closes the connection)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("no event")


def assert_aborted(server, request) -> None:
    assert wait_until(lambda: request.finish_reason is not None, timeout=10)
    assert request.finish_reason == "abort"
    assert len(request.output_token_ids) < LONG
    assert wait_until(lambda: server.engine.num_running == 0 and server.engine.num_waiting == 0, timeout=10)


def test_full_queue_is_429_with_retry_after(live):
    with httpx.stream("POST", f"{live.url}/v1/completions", json=long_body(stream=True), timeout=60) as running:
        running_lines = running.iter_lines()
        first_event(running_lines)
        with httpx.stream("POST", f"{live.url}/v1/completions", json=long_body(stream=True), timeout=60) as waiting:
            assert waiting.status_code == 200
            assert wait_until(lambda: live.engine.num_waiting == 1)
            refused = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
            assert refused.json()["error"]["type"] == "rate_limit_error"
            many = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 1, "n": 3})
            assert many.status_code == 429
    for request in live.made[:2]:
        assert_aborted(live, request)
    ok = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_streaming_disconnect_frees_row_and_adapter_slot(live, builtin_model_dir):
    lora = peft_lora(str(builtin_model_dir), seed=3)
    assert upload(live.url, "held", list(adapter_files(lora).items())).status_code == 201
    live.made.clear()
    with httpx.stream("POST", f"{live.url}/v1/completions", json=long_body(stream=True, adapter="held"),
                      timeout=60) as response:
        lines = response.iter_lines()
        first_event(lines)
        request = live.made[-1]
        slot = request.slot
        assert slot != 0 and live.engine.adapters.table.refs(slot) == 1
    assert_aborted(live, request)
    assert request.slot == 0 and live.engine.adapters.table.refs(slot) == 0


def test_non_streaming_disconnect_aborts(live):
    live.made.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/chat/completions", timeout=httpx.Timeout(60, read=1.0),
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": LONG, "ignore_eos": True})
    assert_aborted(live, live.made[-1])


def test_request_timeout(short_timeout):
    short_timeout.made.clear()
    response = httpx.post(f"{short_timeout.url}/v1/completions", json=long_body(), timeout=60)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout" and "1 s" in response.json()["error"]["message"]
    assert_aborted(short_timeout, short_timeout.made[-1])
    with httpx.stream("POST", f"{short_timeout.url}/v1/completions", json=long_body(stream=True),
                      timeout=60) as streamed:
        events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "timeout" and "[DONE]" not in events
    assert_aborted(short_timeout, short_timeout.made[-1])
