"""Prefix caching seen by clients: usage.prompt_tokens_details.cached_tokens (plain and streamed) and the
Prometheus metrics of the prefix cache and the KV pool, on a live server."""
import httpx
import pytest

from tests.api_support import serve
from tests.test_api_metrics import scrape, value

SYSTEM = "You are a careful assistant. " * 12


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    with serve(builtin_model_dir, tmp_path_factory.mktemp("adapters"), max_seq_len=512) as (server, engine):
        server.engine = engine
        yield server


def chat(url: str, question: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 3, "temperature": 0, **extra})


def test_cached_tokens_and_metrics(live):
    first = chat(live.url, "What is one plus one?").json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    second = chat(live.url, "Name a colour.").json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    block = live.engine.config.kv_block_size
    assert 0 < cached < second["usage"]["prompt_tokens"] and cached % block == 0

    response = chat(live.url, "Name a colour.", stream=True, stream_options={"include_usage": True})
    usage_lines = [line for line in response.text.splitlines() if '"usage": {' in line or '"usage":{' in line]
    assert usage_lines and '"cached_tokens":' in usage_lines[-1].replace(" ", "")
    assert f'"cached_tokens":{second["usage"]["prompt_tokens"] - 1 - (second["usage"]["prompt_tokens"] - 1) % block}' \
        in usage_lines[-1].replace(" ", "")  # the whole prompt was seen: every full block but the last token's

    completion = httpx.post(f"{live.url}/v1/completions", timeout=60,
                            json={"prompt": SYSTEM, "max_tokens": 2, "temperature": 0}).json()
    assert "cached_tokens" in completion["usage"]["prompt_tokens_details"]

    s = scrape(live.url)
    prompts = first["usage"]["prompt_tokens"] + 2 * second["usage"]["prompt_tokens"] + \
        completion["usage"]["prompt_tokens"]
    assert value(s, "prefix_cache_queried_tokens_total") == prompts
    assert value(s, "prefix_cache_hit_tokens_total") >= 2 * cached
    assert value(s, "kv_cache_blocks_total") == live.engine.scheduler.blocks.usable > 0
    assert value(s, "kv_cache_blocks_used") == 0  # nothing running
    assert value(s, "preemptions_total") == 0
