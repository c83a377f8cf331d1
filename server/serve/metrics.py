"""The ingress's metrics: its HTTP-layer metrics, routing counters, and every replica's metrics by label.

``GET /metrics`` on the ingress (``render_async``) answers one exposition with

* the HTTP layer's families, recorded in the ingress as on the single server (requests by status
  and adapter, time to first token, inter-token and end-to-end latency, tokens);
* routing counters: ``adapter_server_routed_requests_total{replica, kind}`` (kind ``adapter`` or
  ``base``; one per attempt), ``adapter_server_affinity_total{result}`` (adapter requests that
  landed on a replica already holding that adapter version: ``hit``, or not: ``miss``),
  ``adapter_server_replica_retries_total`` and ``adapter_server_replica_failures_total``, and
  ``adapter_server_replicas_scraped`` (replicas that answered this scrape);
* each engine replica's own families (queue depth, batch size, adapter cache, slots, merges), fetched
  at scrape time by a broadcast to every replica and labelled ``replica="EngineReplica#<id>"``.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from prometheus_client import Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import PREFIX, Metrics

# recorded by the HTTP layer (the ingress's are real, the replicas' always zero)
HTTP_FAMILIES = frozenset(f"{PREFIX}_{n}" for n in ("requests", "time_to_first_token_seconds",
                                                     "inter_token_latency_seconds", "e2e_request_latency_seconds",
                                                     "prompt_tokens", "generation_tokens"))
ROUTING_PREFIXES = (f"{PREFIX}_routed_requests", f"{PREFIX}_affinity", f"{PREFIX}_replica")


def _base_name(family_name: str) -> str:
    for suffix in ("_created", "_total"):
        family_name = family_name.removesuffix(suffix)
    return family_name


class _Families:
    """A collector over already-parsed families (what ``generate_latest`` needs)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


class RayIngressMetrics(Metrics):
    """Metrics of the ingress; ``replica_texts()`` returns [(label, exposition text)] of every replica."""

    def __init__(self, replica_texts: Callable[[], Awaitable[list[tuple[str, str]]]], max_adapter_labels: int = 20):
        super().__init__(max_adapter_labels=max_adapter_labels)
        self._replica_texts = replica_texts
        r = self.registry
        self.routed = Counter(f"{PREFIX}_routed_requests", "Requests sent to each engine replica (each attempt)",
                              ["replica", "kind"], registry=r)
        self.affinity = Counter(f"{PREFIX}_affinity", "Adapter requests that reached a replica already holding "
                                "the adapter version (hit) or not (miss)", ["result"], registry=r)
        for result in ("hit", "miss"):
            self.affinity.labels(result=result)
        self.retries = Counter(f"{PREFIX}_replica_retries", "Requests sent again after a replica failed "
                               "before any output", registry=r)
        self.replica_failures = Counter(f"{PREFIX}_replica_failures", "Requests ended by a replica failure after "
                                        "output had been produced (or after every retry)", registry=r)
        self.replicas_scraped = Gauge(f"{PREFIX}_replicas_scraped", "Engine replicas that answered the last "
                                      "metrics scrape", registry=r)

    def record_route(self, replica: str, hit: bool | None) -> None:
        self.routed.labels(replica=replica, kind="base" if hit is None else "adapter").inc()
        if hit is not None:
            self.affinity.labels(result="hit" if hit else "miss").inc()

    async def render_async(self) -> tuple[bytes, str]:
        """The merged exposition (see the module docstring) and its content type."""
        texts = await self._replica_texts()
        self.replicas_scraped.set(len(texts))
        own = [f for f in text_string_to_metric_families(generate_latest(self.registry).decode())
               if _base_name(f.name) in HTTP_FAMILIES or _base_name(f.name).startswith(ROUTING_PREFIXES)]
        merged: dict[str, object] = {}
        for label, text in sorted(texts):
            for family in text_string_to_metric_families(text):
                if _base_name(family.name) in HTTP_FAMILIES:
                    continue
                target = merged.setdefault(family.name, family)
                samples = [s._replace(labels={**s.labels, "replica": label}) for s in family.samples]
                if target is family:
                    family.samples = samples
                else:
                    target.samples.extend(samples)
        return generate_latest(_Families(own + list(merged.values()))), CONTENT_TYPE_LATEST
