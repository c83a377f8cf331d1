"""Scale-out on Ray Serve (server.serve): a local Ray cluster, 2 engine replicas (1 torch thread each), the tiny
model, 6 adapters of the three kinds uploaded through the ingress.

Checked: 48 concurrent requests (streamed and not, completions and chat) all succeed with the single server's
greedy outputs; after warm-up an adapter's requests land on one replica; base requests use both; every response
names its replica; uploads, overwrites and deletes are seen by every replica at once, old weights never served;
per-replica metrics and routing counters; a client that goes away; a replica killed while serving. Skipped
without ``ray[serve]`` (tests/test_ray_serve_client.py tests the client's retry logic without Ray).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, defaultdict
from types import SimpleNamespace

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from server.api.app import create_app  # noqa: E402
from server.config import EngineConfig, ServerConfig  # noqa: E402
from server.engine.factory import build_engine  # noqa: E402
from server.serve.trace import HEADER  # noqa: E402
from tests.api_support import adapter_files, upload  # noqa: E402
from tests.peft_adapters import make_ia3, make_lora, make_prefix  # noqa: E402
from tests.server_harness import LiveServer, free_port  # noqa: E402

pytestmark = pytest.mark.timeout(400)
APP = "adapter-server"
KINDS = {"lora-a": (make_lora, 1), "lora-b": (make_lora, 2), "ia3-a": (make_ia3, 3), "ia3-b": (make_ia3, 4),
         "prefix-a": (make_prefix, 5), "prefix-b": (make_prefix, 6)}


@pytest.fixture(scope="module")
def sources(builtin_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-adapters")
    made = {name: make(builtin_model_dir, root / name, seed) for name, (make, seed) in KINDS.items()}
    made["lora-new"] = make_lora(builtin_model_dir, root / "lora-new", 9)
    return made


@pytest.fixture(scope="module")
def cluster(builtin_model_dir, tmp_path_factory, sources):
    from server.serve.app import RayOptions, build_app, start_cluster

    config = EngineConfig(model=str(builtin_model_dir), adapter_dir=str(tmp_path_factory.mktemp("ray-store")),
                          max_batch=8, max_seq_len=512, max_waiting=64, max_adapter_slots=4, max_lora_rank=8,
                          dtype="float32")
    server_config = ServerConfig(port=free_port(), request_timeout=120)
    options = RayOptions(replicas=2, replica_cpus=1, num_cpus=2)
    start_cluster(options, server_config, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        serve.run(build_app(config, server_config, options), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{server_config.port}"
        for name, path in sources.items():
            if name != "lora-new":
                assert upload(url, name, list(adapter_files(path).items())).status_code == 201
        yield SimpleNamespace(url=url, config=config)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(cluster):
    """The single server on the same store: the reference for greedy outputs."""
    with LiveServer(create_app(build_engine(cluster.config))) as live:
        yield live.url


def spec(i: int, model: str) -> dict:
    chat, stream = i % 3 == 0, i % 2 == 0
    body = {"model": model, "max_tokens": 8, "temperature": 0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": f"question {i} about {model}"}]
    else:
        body["prompt"] = f"Request {i}: once upon a time"
    return body


async def call(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """status, replica header, text, error of one request (streamed or not)."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if not body.get("stream"):
        r = await client.post(url + path, json=body)
        data = r.json()
        choice = (data.get("choices") or [{}])[0]
        text = choice.get("message", {}).get("content") if "messages" in body else choice.get("text")
        return {"status": r.status_code, "replica": r.headers.get(HEADER), "text": text, "error": data.get("error")}
    text, error = "", None
    async with client.stream("POST", url + path, json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            for c in event["choices"]:
                text += (c.get("delta", {}).get("content") or "") if "messages" in body else c["text"]
        return {"status": r.status_code, "replica": r.headers.get(HEADER), "text": text, "error": error}


def run_all(url: str, bodies: list[dict]) -> list[dict]:
    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(call(client, url, b) for b in bodies))

    return asyncio.run(main())


def test_concurrent_requests_affinity_and_equal_outputs(cluster, single):
    names = list(KINDS)
    run_all(cluster.url, [spec(100 + j, name) for j, name in enumerate(names)])  # warm-up: each adapter resident once
    time.sleep(1.0)  # replicas push their multiplexed adapter ids to the routers every 0.1 s
    bodies = [spec(i, names[i % 8]) if i % 8 < 6 else spec(i, "tiny-llama-builtin") for i in range(48)]
    results = run_all(cluster.url, bodies)
    assert [r["status"] for r in results] == [200] * 48, [r for r in results if r["status"] != 200]
    assert all(r["error"] is None and r["replica"].startswith("EngineReplica#") for r in results)
    reference = run_all(single, bodies)
    assert [r["text"] for r in results] == [r["text"] for r in reference]

    by_model = defaultdict(Counter)
    for body, r in zip(bodies, results):
        by_model[body["model"]][r["replica"]] += 1
    for name in names:
        top = by_model[name].most_common(1)[0][1]
        assert top / sum(by_model[name].values()) >= 0.9, (name, by_model[name])
    # Base requests carry no multiplexed id, so Ray's router places them by load (power of two choices):
    # beside adapter traffic pinned to one replica they may all go to the other. Alone, they spread.
    base_only = run_all(cluster.url, [spec(200 + i, "tiny-llama-builtin") for i in range(24)])
    assert all(r["status"] == 200 for r in base_only)
    assert len({r["replica"] for r in base_only}) == 2, Counter(r["replica"] for r in base_only)

    r = httpx.get(cluster.url + "/v1/models")
    assert r.status_code == 200 and r.headers[HEADER].startswith("Ingress#")
    assert {m["id"] for m in r.json()["data"]} >= set(names)


def test_metrics_per_replica_and_routing_counters(cluster):
    run_all(cluster.url, [spec(1, "lora-a"), spec(2, "tiny-llama-builtin")])
    text = httpx.get(cluster.url + "/metrics").text
    replicas = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("adapter_server_adapter_cache_misses_total{")}
    assert len(replicas) == 2 and all(r.startswith("EngineReplica#") for r in replicas)
    assert "adapter_server_replicas_scraped 2.0" in text
    assert 'adapter_server_routed_requests_total{kind="adapter",replica="EngineReplica#' in text
    hits = float(text.split('adapter_server_affinity_total{result="hit"} ')[1].split()[0])
    misses = float(text.split('adapter_server_affinity_total{result="miss"} ')[1].split()[0])
    assert hits >= 0.8 * (hits + misses), (hits, misses)
    assert text.count("# TYPE adapter_server_queue_depth gauge") == 1  # one family, a sample per replica


def test_overwrite_and_delete_are_seen_by_every_replica(cluster, single, sources, builtin_model_dir):
    from transformers import AutoTokenizer

    from adapters.store import AdapterNotFound, AdapterStore
    from server.engine.adapter_pool import version_key
    from server.engine.request import SamplingParams

    store = AdapterStore(cluster.config.adapter_dir)
    old_version = version_key(store.get("lora-a"))
    bodies = [{**spec(i, "lora-a"), "stream": i % 2 == 0} for i in range(4)]
    before = run_all(cluster.url, bodies)
    assert upload(cluster.url, "lora-a", list(adapter_files(sources["lora-new"]).items()), overwrite=True).status_code == 201
    after, reference = run_all(cluster.url, bodies), run_all(single, bodies)
    assert [r["text"] for r in after] == [r["text"] for r in reference]
    assert [r["text"] for r in after] != [r["text"] for r in before]  # the new weights, not the old ones

    # A request routed by the *old* version (an ingress that resolved the name before the overwrite) reaches
    # the replica holding it, which resolves the name in the index again and serves the new weights.
    handle = serve.get_deployment_handle("EngineReplica", app_name=APP)
    ids = AutoTokenizer.from_pretrained(builtin_model_dir).encode(bodies[1]["prompt"], add_special_tokens=True)
    payload = {"prompt_token_ids": ids, "params": SamplingParams(max_tokens=8, temperature=0), "adapter": "lora-a",
               "adapter_version": old_version, "request_id": "stale-route"}
    items = list(handle.options(multiplexed_model_id=old_version, stream=True).generate.remote(payload))
    outputs = items[0]["outputs"] + [o for batch in items[1:] for o in batch]
    assert "".join(o.text for o in outputs) == reference[1]["text"]

    assert httpx.delete(cluster.url + "/v1/adapters/ia3-b").status_code == 200
    r = run_all(cluster.url, [spec(3, "ia3-b")])[0]
    assert r["status"] == 404
    payload = {**payload, "adapter": "ia3-b", "adapter_version": "ia3-b@0", "request_id": "deleted"}
    items = list(handle.options(multiplexed_model_id="ia3-b@0", stream=True).generate.remote(payload))
    assert isinstance(items[0]["error"], AdapterNotFound)  # the replica refuses: nothing served from a cached copy


def test_client_gone_frees_the_replica_row(cluster):
    body = {"prompt": "Leave early", "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=60) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data: {"))
    handle = serve.get_deployment_handle("EngineReplica", app_name=APP)
    while sum(i["running"] + i["waiting"] for i in handle.broadcast("info").results(timeout_s=10)) and \
            time.monotonic() < start + 30:
        time.sleep(0.05)
    freed = time.monotonic() - start
    full = time.monotonic()
    assert httpx.post(cluster.url + "/v1/completions", json={**body, "stream": False}, timeout=60).status_code == 200
    assert freed < time.monotonic() - full, "the row was freed only when the request had run to its end"
    assert httpx.get(cluster.url + "/health").json()["running"] == 0


def test_replica_killed_while_serving(cluster):
    """In-flight streams on the killed replica end with an error event; the survivor's streams and new requests
    succeed; Ray Serve starts a replacement."""
    long_bodies = [{"model": m, "prompt": f"Fault {i}", "max_tokens": 300, "ignore_eos": True, "temperature": 0,
                    "stream": True} for i, m in enumerate(["tiny-llama-builtin"] * 6 + ["lora-b", "prefix-a"])]
    heads, results, started = {}, {}, threading.Barrier(len(long_bodies) + 1, timeout=120)

    def stream(i: int, body: dict) -> None:
        finish, error = None, None
        with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=120) as r:
            heads[i] = r.headers[HEADER]
            started.wait()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    error = event.get("error", error)
                    finish = finish or next((c["finish_reason"] for c in event.get("choices", ())), None)
        results[i] = (finish, error)

    threads = [threading.Thread(target=stream, args=(i, b)) for i, b in enumerate(long_bodies)]
    for t in threads:
        t.start()
    started.wait()
    victim = Counter(heads.values()).most_common(1)[0][0]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{victim}", namespace="serve"))
    after = run_all(cluster.url, [spec(i, "tiny-llama-builtin") for i in range(6)] + [spec(7, "lora-b")])
    for t in threads:
        t.join(timeout=120)

    assert all(r["status"] == 200 and r["error"] is None and r["replica"] != victim for r in after), after
    on_victim = [i for i in heads if heads[i] == victim]
    for i in heads:
        finish, error = results[i]
        if i in on_victim and error is not None:
            assert "failed while serving" in error["message"] and victim in error["message"], error
        else:
            assert error is None and finish == "length", (i, heads[i], results[i])
    assert any(results[i][1] is not None for i in on_victim)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = serve.status().applications[APP].deployments["EngineReplica"]
        if state.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    assert serve.status().applications[APP].deployments["EngineReplica"].replica_states.get("RUNNING") == 2

    def scraped() -> set[str]:  # the ingress's router learns of the new replica a moment after it runs
        return {line.split('replica="')[1].split('"')[0] for line in httpx.get(cluster.url + "/metrics").text
                .splitlines() if line.startswith("adapter_server_queue_depth{")}

    while len(scraped()) < 2 and time.monotonic() < deadline + 30:
        time.sleep(0.5)
    replicas = scraped()
    assert len(replicas) == 2 and victim not in replicas, replicas
