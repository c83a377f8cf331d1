"""Every Prometheus object of the server, in one place, on a registry of its own.

One :class:`Metrics` belongs to one engine and its HTTP app; nothing is registered in
prometheus-client's process-global registry, so several engines can live in one process
(tests, Ray Serve replicas). Who records what:

* the HTTP layer: requests by endpoint, status and adapter; time to first token,
  inter-token latency and end-to-end latency; prompt and generated tokens;
* the engine thread: adapter cache hits, misses, loads, evictions and load latency, slots
  in use, merged adapters and merge events (attribute names are part of the engine contract);
* scrape time: queue depth and running batch size, read from the engine (:meth:`bind_engine`).

Adapter names become label values only through :class:`AdapterLabels`, which bounds their
number: the first ``max_named`` adapters seen keep their own name, every later one is
counted as ``__other__``. Names that never resolved to a stored adapter are never used as
labels (a client could otherwise create a series per made-up name).
"""
from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "adapter_server"
BASE_LABEL = "__base__"        # requests on the base model (no adapter)
OTHER_LABEL = "__other__"      # adapters beyond the named ones
UNKNOWN_LABEL = "__unknown__"  # requests refused before their adapter was resolved
# Adapter names start with a letter or digit (adapters.store.NAME_RE), so these cannot collide.

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AdapterLabels:
    """Maps adapter names to a bounded set of label values (thread-safe)."""

    def __init__(self, max_named: int = 20):
        self.max_named = max(0, int(max_named))
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_LABEL
        with self._lock:
            if adapter in self._named:
                return adapter
            if len(self._named) < self.max_named:
                self._named.add(adapter)
                return adapter
        return OTHER_LABEL


class Metrics:
    """The server's metric objects, registered on ``self.registry``."""

    def __init__(self, max_adapter_labels: int = 20):
        self.registry = CollectorRegistry(auto_describe=True)
        self.adapter_label = AdapterLabels(max_adapter_labels)
        r = self.registry

        # ---- HTTP layer
        self.requests = Counter(f"{PREFIX}_requests", "Inference requests by endpoint, HTTP status and adapter "
                                "(499: the client went away, 504: the request timed out)",
                                ["endpoint", "status", "adapter"], registry=r)
        self.time_to_first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                                             "From arrival to the first generated token, per sequence",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                                             "Between consecutive generated tokens of one sequence",
                                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram(f"{PREFIX}_e2e_request_latency_seconds",
                                     "From arrival to the last generated token, per sequence",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed (once per sequence)",
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", registry=r)

        # ---- scrape time (see bind_engine)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running_batch_size = Gauge(f"{PREFIX}_running_batch_size", "Requests decoding in the batch", registry=r)

        # ---- engine thread (names fixed by the engine contract)
        self.adapter_cache_hits = Counter(f"{PREFIX}_adapter_cache_hits",
                                          "Adapter requests admitted whose adapter was in a device slot when they "
                                          "were first considered", registry=r)
        self.adapter_cache_misses = Counter(f"{PREFIX}_adapter_cache_misses",
                                            "Adapter requests that waited for their adapter to be loaded into a "
                                            "device slot", registry=r)
        self.adapter_loads = Counter(f"{PREFIX}_adapter_loads", "Adapters loaded from the store", registry=r)
        self.adapter_evictions = Counter(f"{PREFIX}_adapter_evictions", "Adapters evicted from slots or the cache",
                                         registry=r)
        self.adapter_load_seconds = Histogram(f"{PREFIX}_adapter_load_seconds", "Time to load one adapter",
                                              buckets=LOAD_BUCKETS, registry=r)
        self.adapter_slots_in_use = Gauge(f"{PREFIX}_adapter_slots_in_use", "Device adapter slots holding an adapter",
                                          registry=r)
        self.merged_adapters = Gauge(f"{PREFIX}_merged_adapters", "Adapters merged into the base weights",
                                     registry=r)
        self.merge_events = Counter(f"{PREFIX}_merge_events", "Adapter merges and unmerges", ["action"], registry=r)
        for action in ("merge", "unmerge"):
            self.merge_events.labels(action=action)

        # ---- adapter tiers (issue 26: hundreds of adapters)
        self.adapter_slot_wait_seconds = Histogram(
            f"{PREFIX}_adapter_slot_wait_seconds", "From the first time the scheduler considered an adapter request "
            "(a batch row was free) to its admission with its adapter in a device slot: store read + copy, plus any "
            "wait for a row that filled meanwhile; 0 when the adapter was resident", buckets=LOAD_BUCKETS, registry=r)
        self.adapters_resident = Gauge(f"{PREFIX}_adapters_resident", "Adapters resident per tier (device slots, "
                                       "CPU cache)", ["tier"], registry=r)
        for tier in ("device", "cpu"):
            self.adapters_resident.labels(tier=tier)

        # ---- engine thread: paged KV cache and prefix caching (observe_kv_cache, once per step)
        self.prefix_cache_queries = Counter(f"{PREFIX}_prefix_cache_queried_tokens",
                                            "Prompt tokens looked up in the prefix cache at admission", registry=r)
        self.prefix_cache_hits = Counter(f"{PREFIX}_prefix_cache_hit_tokens",
                                         "Prompt tokens served from cached KV blocks (not recomputed)", registry=r)
        self.kv_blocks_used = Gauge(f"{PREFIX}_kv_cache_blocks_used", "KV-cache blocks held by running requests",
                                    registry=r)
        self.kv_blocks_total = Gauge(f"{PREFIX}_kv_cache_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.preemptions = Counter(f"{PREFIX}_preemptions", "Running requests preempted for KV blocks "
                                   "(recomputed later)", registry=r)
        self._kv_seen = (0, 0, 0)

    def bind_engine(self, engine: Any) -> None:
        """Read queue depth and running batch size from ``engine`` at every scrape."""
        self.queue_depth.set_function(lambda: engine.num_waiting)
        self.running_batch_size.set_function(lambda: engine.num_running)

    def observe_kv_cache(self, queried: int, hits: int, preemptions: int, used: int, total: int) -> None:
        """The engine's running totals of prefix-cache queried and hit tokens and preemptions, and the pool's
        blocks in use and in all (the counters advance by what changed since the last call)."""
        seen, self._kv_seen = self._kv_seen, (queried, hits, preemptions)
        for counter, now, before in zip((self.prefix_cache_queries, self.prefix_cache_hits, self.preemptions),
                                        self._kv_seen, seen):
            if now > before:
                counter.inc(now - before)
        self.kv_blocks_used.set(used)
        self.kv_blocks_total.set(total)

    def record_request(self, endpoint: str, status: int, adapter_label: str) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status), adapter=adapter_label).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
