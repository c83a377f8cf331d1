"""GET /metrics: scraped from a real server and parsed with prometheus-client's own parser."""
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import BASE_LABEL, OTHER_LABEL, UNKNOWN_LABEL, AdapterLabels, Metrics
from tests.api_support import adapter_files, peft_lora, serve, upload, wait_until

BASE = "tiny-llama-builtin"
P = "adapter_server_"


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    with serve(builtin_model_dir, tmp_path_factory.mktemp("adapters"), max_seq_len=1024) as (server, engine):
        server.engine = engine
        yield server


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape."""
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((P + name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_latencies_and_tokens(live, builtin_model_dir):
    assert upload(live.url, "m1", list(adapter_files(peft_lora(str(builtin_model_dir), seed=4)).items())) \
        .status_code == 201
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    for _ in range(2):
        client.completions.create(model=BASE, prompt="Hello", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    client.completions.create(model="m1", prompt="Hello", max_tokens=5, temperature=0, n=2,
                              extra_body={"ignore_eos": True})
    list(client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                        temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert httpx.post(f"{live.url}/v1/completions", json={"prompt": 5}).status_code == 400
    assert httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "model": "ghost"}).status_code == 404
    assert httpx.post(f"{live.url}/v1/completions", json={"prompt": "x" * 2000}).status_code == 400

    s = scrape(live.url)
    assert value(s, "requests_total", endpoint="completions", status="200", adapter=BASE_LABEL) == 2
    assert value(s, "requests_total", endpoint="completions", status="200", adapter="m1") == 1
    assert value(s, "requests_total", endpoint="chat", status="200", adapter="m1") == 1
    assert value(s, "requests_total", endpoint="completions", status="400", adapter=UNKNOWN_LABEL) == 1
    assert value(s, "requests_total", endpoint="completions", status="404", adapter=UNKNOWN_LABEL) == 1
    assert value(s, "requests_total", endpoint="completions", status="400", adapter=BASE_LABEL) == 1
    sequences, tokens = 5, 25  # 2 base + 2 (n=2) + 1 chat, 5 tokens each
    assert value(s, "time_to_first_token_seconds_count") == sequences
    assert value(s, "e2e_request_latency_seconds_count") == sequences
    assert value(s, "inter_token_latency_seconds_count") == tokens - sequences
    assert value(s, "time_to_first_token_seconds_bucket", le="+Inf") == sequences
    assert value(s, "generation_tokens_total") == tokens
    assert value(s, "prompt_tokens_total") == 6 * 5  # "Hello": bos + 5 bytes; chat: bos <|user|> Hi <|end|> <|assistant|>
    assert (P + "queue_depth", frozenset()) in s and (P + "running_batch_size", frozenset()) in s
    for name in ("adapter_cache_hits_total", "adapter_cache_misses_total", "adapter_loads_total",
                 "adapter_evictions_total", "adapter_load_seconds_count", "adapter_slots_in_use",
                 "merged_adapters"):
        assert (P + name, frozenset()) in s, name
    assert (P + "merge_events_total", frozenset({("action", "merge")})) in s
    assert value(s, "adapter_loads_total") >= 1


def test_a_client_that_disconnects_is_counted_as_499(live):
    body = {"prompt": "Hello", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    assert wait_until(lambda: value(scrape(live.url), "requests_total", endpoint="completions", status="499",
                                    adapter=BASE_LABEL) == 1)
    assert wait_until(lambda: live.engine.num_running == 0)


def test_adapter_labels_are_bounded():
    labels = AdapterLabels(max_named=2)
    assert [labels(n) for n in ("a", "b", "c", "a", None, "d")] == ["a", "b", OTHER_LABEL, "a", BASE_LABEL,
                                                                    OTHER_LABEL]


def test_each_metrics_object_has_its_own_registry():
    first, second = Metrics(), Metrics()
    first.adapter_loads.inc()
    assert first.registry is not second.registry
    assert second.registry.get_sample_value(P + "adapter_loads_total") == 0
    assert first.registry.get_sample_value(P + "adapter_loads_total") == 1
