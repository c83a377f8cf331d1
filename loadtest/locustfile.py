"""Locust load test of the OpenAI completions API with many adapters.

Each simulated user sends ``POST /v1/completions`` back to back (or after an exponential
think time: ``--think-time``, which makes each user a Poisson source). Requests name an
adapter drawn from a Zipf-like popularity over the adapters the server holds (``GET
/v1/adapters``, else ``GET /v1/models``): ``--adapter-count`` of them, in the kind proportions of
``--mix``, ranked so that rank i is asked for with probability ~ 1 / (i + 1) ** ``--zipf-skew``;
``--base-fraction`` of requests use the base model. ``--stream-fraction`` of requests are
streamed (SSE). Every request has ``ignore_eos`` set, so it generates exactly ``--max-tokens``.

Locust statistics, by request type:

* ``POST`` ``/v1/completions [<kind>]`` / ``[<kind> stream]``: the whole request; for a streamed
  one the time runs to the end of the stream, not to the response headers;
* ``TTFT`` ``[<kind>]``: time to first token of streamed requests, a metric of its own;
* ``TPOT`` ``[<kind>]``: mean time per output token after the first, of streamed requests.

A bounded headless run against a local server (``make serve`` in another shell)::

    .venv/bin/locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 \\
        -u 8 -r 8 -t 60s --stop-timeout 30 --only-summary \\
        --zipf-skew 1.0 --mix lora=0.5,ia3=0.25,prefix=0.25 --base-fraction 0.1 \\
        --stream-fraction 0.5 --max-tokens 32 --csv results/locust

(``make loadtest`` runs this; ``ARGS=...`` adds flags.) It exits by itself after ``-t``;
the exit code is 1 if any request failed.
"""
from __future__ import annotations

import json
import logging
import random
import time

import httpx
from locust import HttpUser, events, task

from loadtest.client import COMPLETIONS, request_body
from loadtest.workload import RequestSpec, Workload, parse_mix, ranked_from_available

log = logging.getLogger("locustfile")


class _State:
    """What ``test_start`` learned from the server, shared by all users of this process."""

    workload: Workload | None = None
    base_model: str = ""
    rng = random.Random(0)


@events.init_command_line_parser.add_listener
def _options(parser):
    group = parser.add_argument_group("adapter-server load")
    group.add_argument("--adapter-count", type=int, default=None,
                       help="adapters in play (default: all the server holds)")
    group.add_argument("--zipf-skew", type=float, default=1.0, help="popularity skew (0: uniform)")
    group.add_argument("--mix", default="lora=0.5,ia3=0.25,prefix=0.25", help="adapter kinds in play, by weight")
    group.add_argument("--base-fraction", type=float, default=0.1, help="share of requests on the base model")
    group.add_argument("--stream-fraction", type=float, default=0.5, help="share of requests streamed")
    group.add_argument("--max-tokens", type=int, default=32)
    group.add_argument("--prompt-words", type=int, default=24)
    group.add_argument("--think-time", type=float, default=0.0, help="mean exponential pause between requests, s")
    group.add_argument("--workload-seed", type=int, default=0)
    group.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'", env_var="ADAPTER_API_KEY")


def _headers(options) -> dict:
    return {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}


def discover(host: str, headers: dict) -> tuple[str, dict[str, list[str]]]:
    """The base model's name and the server's adapters by kind."""
    host = host.rstrip("/")
    base = httpx.get(f"{host}/health", headers=headers, timeout=30).json().get("model", "")
    by_kind: dict[str, list[str]] = {}
    response = httpx.get(f"{host}/v1/adapters", headers=headers, timeout=30)
    if response.status_code == 200:
        entries = [(a["name"], a["kind"]) for a in response.json()["data"]]
    else:  # not an admin key: the model list names adapters and their kind too
        models = httpx.get(f"{host}/v1/models", headers=headers, timeout=30).json()["data"]
        entries = [(m["id"], m.get("kind", "lora")) for m in models if m.get("kind") != "base" and m["id"] != base]
    for name, kind in entries:
        by_kind.setdefault(kind, []).append(name)
    return base, by_kind


@events.test_start.add_listener
def _on_test_start(environment, **_kw):
    options = environment.parsed_options
    base, available = discover(environment.host, _headers(options))
    ranked = ranked_from_available(available, options.adapter_count, parse_mix(options.mix))
    if not ranked:
        log.warning("the server holds no adapters of the kinds in --mix: every request goes to the base model")
    log.info("base model %s; %d adapters in play: %s", base, len(ranked), ", ".join(ranked[:8]) +
             (" ..." if len(ranked) > 8 else ""))
    _State.base_model = base
    _State.rng = random.Random(options.workload_seed + 1)
    _State.workload = Workload(ranked, skew=options.zipf_skew, base_fraction=options.base_fraction,
                               seed=options.workload_seed, prompt_tokens=options.prompt_words,
                               max_tokens=options.max_tokens)


class CompletionUser(HttpUser):
    """One client sending completions; see the module docstring."""

    def wait_time(self):
        mean = self.environment.parsed_options.think_time
        return _State.rng.expovariate(1.0 / mean) if mean > 0 else 0.0

    @task
    def complete(self) -> None:
        options = self.environment.parsed_options
        spec = _State.workload.next()
        stream = _State.rng.random() < options.stream_fraction
        body = request_body(spec, _State.base_model, stream=stream)
        name = f"{COMPLETIONS} [{spec.kind}{' stream' if stream else ''}]"
        headers = _headers(options)
        if not stream:
            with self.client.post(COMPLETIONS, json=body, headers=headers, name=name, catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                elif resp.json().get("usage", {}).get("completion_tokens") != spec.max_tokens:
                    resp.failure(f"expected {spec.max_tokens} tokens, got {resp.json().get('usage')}")
            return
        self._stream(spec, body, headers, name)

    def _stream(self, spec: RequestSpec, body: dict, headers: dict, name: str) -> None:
        start = time.perf_counter()
        first = last = None
        tokens, error = 0, None
        with self.client.post(COMPLETIONS, json=body, headers=headers, name=name, stream=True,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done = False
            for line in resp.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    error = f"stream error: {event['error']}"
                    continue
                if any(c.get("text") for c in event.get("choices") or ()):
                    last = time.perf_counter()
                    if first is None:
                        first = last
                        self._fire("TTFT", spec, (first - start) * 1000)
                if event.get("usage"):
                    tokens = event["usage"].get("completion_tokens", 0)
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000  # the whole stream
            if error or not done:
                resp.failure(error or "stream ended without [DONE]")
            elif tokens and tokens != spec.max_tokens:
                resp.failure(f"expected {spec.max_tokens} tokens, got {tokens}")
            else:
                resp.success()
        if first is not None and last is not None and tokens > 1:
            self._fire("TPOT", spec, (last - first) / (tokens - 1) * 1000)

    def _fire(self, metric: str, spec: RequestSpec, milliseconds: float) -> None:
        self.environment.events.request.fire(request_type=metric, name=f"[{spec.kind}]", response_time=milliseconds,
                                             response_length=0, exception=None, context={})
