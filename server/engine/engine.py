"""The engine: owns model, KV cache and scheduler; runs continuous batching in its own thread.

Callers (the HTTP layer, tests, benchmarks) submit requests and receive
RequestOutput updates through a callback; `RequestStream` adapts that to an
asyncio iterator so the event loop never waits on a forward pass. An engine step
is three moves: the scheduler plans it as data (prompt chunks of at most
--max-prefill-tokens padded tokens, decode rows, admission failures), the runner
executes the plan's forwards and samples, and one postprocess pass appends tokens,
finishes requests and applies row moves.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adapters.composition import Composition
from adapters.format import AdapterError, BaseSpec
from adapters.store import AdapterStore
from server.config import EngineConfig
from server.engine.adapter_pool import AdapterPool, version_key
from server.engine.block_manager import BlockManager
from server.engine.merge_policy import MergePolicy
from server.engine.detokenizer import IncrementalDetokenizer, TokenizerText
from server.engine.request import QueueFull, Request, RequestError, RequestOutput, SamplingParams, Status
from server.engine.runner import ModelRunner, StepOutput
from server.engine.sampling import RowSampling, make_generator
from server.engine.scheduler import Scheduler, StepPlan
from server.engine import threads as torch_threads
from server.engine.streams import LoopMailbox, RequestStream
from server.engine.structured import Grammars
from server.engine.slot_sizing import SlotPlan, bytes_per_slot, plan_slots
from server.model.adapter_layers import install_adapter_layers, uninstall_adapter_layers
from adapters.kinds.bottleneck import check_saved_head
from adapters.kinds import KIND_BY_NAME
from server.model.bottleneck_layers import lm_head_weight
from server.model.adapter_layers import linear_shapes, slot_itemsize
from server.model.builtin import default_cache_dir
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel

log = logging.getLogger(__name__)

# While every waiting request waits for its adapter, the loop sleeps until a load or slot copy ends (their threads
# wake it); it looks again after this long regardless, so a wake-up path missed by a future change costs a delay,
# never a hang.
IDLE_RECHECK_S = 0.25

OutputCallback = Callable[[RequestOutput], None]


@dataclass
class _Tracked:
    """Engine-side state of one request."""

    request: Request
    sampling: RowSampling
    detokenizer: IncrementalDetokenizer
    emit: OutputCallback
    max_tokens: int
    prompt_logprobs: list = field(default_factory=list)  # filled chunk by chunk, sent with the first output

    def take_prompt_logprobs(self):
        """The prompt's scores for the first output (None if not asked for), then never again."""
        if self.request.params.prompt_logprobs is None or self.prompt_logprobs is None:
            return None
        entries, self.prompt_logprobs = self.prompt_logprobs, None
        return entries


class Engine(TokenizerText):
    def __init__(self, loaded: LoadedModel, config: EngineConfig, device: torch.device | str = "cpu",
                 store: AdapterStore | None = None, threads: int | None = None):
        """`threads`: torch's thread count in the engine thread (default: the constructing thread's)."""
        self.loaded = loaded
        self.threads = threads or torch.get_num_threads()
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        args = loaded.model.args
        self.max_seq_len = min(config.max_seq_len or args.max_position_embeddings, args.max_position_embeddings)
        self.vocab_size = loaded.model.args.vocab_size
        self.eos_token_ids = _eos_ids(loaded)
        self.grammars = Grammars(loaded.tokenizer, self.vocab_size, self.eos_token_ids)
        # paged KV: the pool's blocks, from its byte budget (a request never needs more than the pool)
        num_blocks = kv_pool_blocks(config, args, loaded.model.model.embed_tokens.weight.dtype, self.max_seq_len)
        self.max_seq_len = min(self.max_seq_len, (num_blocks - 1) * config.kv_block_size)
        self.runner = ModelRunner(loaded.model, config.max_batch, self.max_seq_len, device, num_blocks=num_blocks,
                                  block_size=config.kv_block_size)
        self.adapters = _make_pool(loaded, config, torch.device(device), store)
        self._generations: dict[str, int] = {}  # adapter name -> times overwritten or deleted (prefix-cache keys)
        self.scheduler = Scheduler(config.max_batch, config.max_waiting, self.adapters.try_acquire,
                                   config.max_prefill_tokens, self.max_seq_len,
                                   blocks=BlockManager(num_blocks, config.kv_block_size, config.enable_prefix_caching),
                                   cache_salt=self._cache_salt, on_preempt=self.adapters.release,
                                   admission=config.admission)
        self._merged_slot = 0
        self._metrics = None
        self._tracked: dict[str, _Tracked] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self.adapters.on_ready = self._wake.set
        self._submit_lock = threading.Lock()
        self._inbox_tenants: Counter[str] = Counter()  # requests of each tenant still in the inbox
        self._rng = random.Random(config.seed)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> LoopMailbox
        self.steps = 0

    # ---- text (any thread) ----

    # ---- submission (any thread) ----

    def make_request(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None,
                     request_id: str | None = None, composition: Composition | None = None) -> Request:
        """Validate and build a request for the base, one adapter, or a composition of several (at most one
        of `adapter` and `composition`); raises RequestError with a client-facing message, AdapterNotFound."""
        params.validate()
        if adapter is not None and composition is not None:
            raise RequestError("name one adapter or a composition of adapters, not both")
        if composition is not None and len(composition.members) == 1 and composition.members[0].weight == 1.0:
            adapter, composition = composition.members[0].name, None  # one adapter as it is
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        request = Request(list(prompt_token_ids), params, adapter)
        if request_id:
            request.request_id = request_id
        if params.response_format is not None:
            request.grammar = self.grammars.compile(params.response_format)  # RequestError -> 400
        if adapter is not None:
            record = self.adapters.record(adapter)  # AdapterNotFound -> 404
            request.adapter_version = version_key(record)
            request.prefix_len = record.num_virtual_tokens
            if not getattr(KIND_BY_NAME.get(record.kind), "prefix_shifts_positions", True):  # MAM: prompt from 0
                request.rope_shift = record.num_virtual_tokens
        elif composition is not None:
            try:
                request.adapter_version, request.prefix_len = self.adapters.plan(composition)
            except AdapterError as exc:  # a composition that cannot be served (AdapterNotFound passes: 404)
                raise RequestError(str(exc)) from exc
            request.composition = composition
        prompt_len = request.num_tokens
        if prompt_len >= self.max_seq_len:
            raise RequestError(f"this model's context is {self.max_seq_len} tokens, but the prompt has {prompt_len}; "
                               "shorten the prompt")
        if params.max_tokens is not None and prompt_len + params.max_tokens > self.max_seq_len:
            raise RequestError(f"this model's context is {self.max_seq_len} tokens, but {prompt_len} prompt tokens "
                               f"+ {params.max_tokens} max_tokens exceed it; lower max_tokens or shorten the prompt")
        return request

    def submit(self, request: Request, emit: OutputCallback) -> None:
        """Queue a request; `emit` is called from the engine thread with every update.

        Raises QueueFull here, in the caller's thread, so the bound is never hit later
        inside the engine (the check and the enqueue are atomic among submitters; the
        engine thread only ever shrinks the queue).
        """
        seed = request.params.seed if request.params.seed is not None else self._rng.getrandbits(63)
        max_tokens = request.params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_seq_len - request.num_tokens
        matcher = Grammars.matcher(request.grammar) if request.grammar is not None else None
        sampling = RowSampling(request.params, make_generator(seed), request=request, eos_token_ids=self.eos_token_ids,
                               matcher=matcher)
        tracked = _Tracked(request, sampling, IncrementalDetokenizer(self.tokenizer, request.params.stop), emit,
                           max_tokens)
        tenant = request.tenant
        with self._submit_lock:
            if len(self.scheduler.waiting) + self._inbox.qsize() >= self.config.max_waiting:
                raise QueueFull(f"the queue holds {self.config.max_waiting} waiting requests; try again later")
            if tenant is not None and tenant.max_waiting is not None and \
                    self.scheduler.waiting.waiting_of(request) + self._inbox_tenants[tenant.name] >= tenant.max_waiting:
                raise QueueFull(f"this tenant's queue holds {tenant.max_waiting} waiting requests; try again later")
            if tenant is not None:
                self._inbox_tenants[tenant.name] += 1
            self._inbox.put(("add", tracked))
        self.adapters.prefetch_request(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stream(self, request: Request) -> RequestStream:
        """Submit from inside an event loop and iterate the outputs asynchronously."""
        loop = asyncio.get_running_loop()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = LoopMailbox(loop)
        stream = RequestStream(request, mailbox, self.abort)
        self.submit(request, stream.push)
        return stream

    # ---- the loop (engine thread) ----

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.adapters.close()

    def _run(self) -> None:
        """The step loop. It sleeps while there is nothing to run: no work, or only requests waiting for their
        adapter's store read or slot copy (an empty plan). Those threads, submit and abort wake it. Polling
        instead (an empty step is ~0.1 ms) spun the engine thread at 100% while adapters loaded: on 2 cores it
        held the GIL against the loading threads, and in-process under 1,000-adapter traffic 72,000 of 74,000
        steps were empty (issue 26)."""
        torch_threads.adopt(self.threads)
        idle = False
        while not self._stopping:
            if not self.scheduler.has_work() and self._inbox.empty():
                self._wake.wait()
            elif idle and self._inbox.empty():
                self._wake.wait(IDLE_RECHECK_S)
            self._wake.clear()  # cleared before the step looks: a wake-up during it is kept for the next wait
            self._drain_inbox()
            self._deliver()
            idle = False
            if self.scheduler.has_work():
                try:
                    idle = self.step()
                except Exception as exc:  # one bad step must not kill the server
                    log.exception("engine step failed; failing its requests")
                    for tracked in list(self._tracked.values()):
                        if tracked.request.status is Status.RUNNING:
                            self._finish(tracked, "error", error=f"internal error: {exc}")
                    self.scheduler.reset_prefix_cache()  # blocks of the failed step may hold anything
                self._deliver()

    def _deliver(self) -> None:
        """Hand this step's outputs to the event loops waiting for them: one wake-up per loop per step."""
        for mailbox in list(self._mailboxes.values()):
            mailbox.deliver()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._tracked[item.request.request_id] = item
                tenant = item.request.tenant
                try:
                    with self._submit_lock:  # leaves the inbox and joins its tenant's queue at once
                        if tenant is not None:
                            self._inbox_tenants[tenant.name] -= 1
                        self.scheduler.add(item.request)
                except QueueFull as exc:
                    self._finish(item, "error", error=str(exc))
            elif kind == "abort" and item in self._tracked:
                self._finish(self._tracked[item], "abort")

    def step(self) -> bool:
        """One engine step: plan it, run its forwards, then apply what they produced. Returns whether there was
        nothing to do (every waiting request waits for its adapter)."""
        self._check_merged()
        self.adapters.stage(self.scheduler.waiting, self.config.max_batch)  # slot copies overlap the queue wait
        plan = self.scheduler.schedule()
        if plan.empty:
            return True
        sampled = self.runner.run(plan, self.adapters, self._sampling_of)
        self._postprocess(plan, sampled)
        return False

    def _sampling_of(self, request: Request) -> RowSampling:
        return self._tracked[request.request_id].sampling

    def _postprocess(self, plan: StepPlan, out: StepOutput) -> None:
        """Fail what could not be admitted, keep prompt scores, append each sampled token (finishing requests
        and moving rows), end prompt-only requests, then let the merge policy see the step."""
        for request, message in plan.failed:
            self._finish(self._tracked[request.request_id], "error", error=message)
        for request, entries in out.prompt_logprobs:
            tracked = self._tracked[request.request_id]
            if entries and entries[0] is None:  # a first chunk: a prefill restarted after a preemption starts over
                tracked.prompt_logprobs = []
            tracked.prompt_logprobs.extend(entries)
        now = time.monotonic()
        for s in out.sampled:
            if s.request.first_token_time is None:
                s.request.first_token_time = now
            self._append(self._tracked[s.request.request_id], s.token_id, s.logprob)
        for chunk in (c for group in plan.prefill for c in group if c.last and c.request.params.max_tokens == 0):
            chunk.request.first_token_time = now
            self._finish(self._tracked[chunk.request.request_id], "length")
        if plan.decode is not None:
            self.adapters.observe_step(self.scheduler.running)
        self._check_merged()
        self._observe_cache()
        self.steps += 1

    def _check_merged(self) -> None:
        """An adapter merged into the base or unmerged changes the weights every request runs through (by
        float rounding, also for the rows that subtract it): K/V cached before are not reused after."""
        if self.adapters.merged_slot != self._merged_slot:
            self._merged_slot = self.adapters.merged_slot
            self.scheduler.reset_prefix_cache()

    def _cache_salt(self, request: Request) -> str:
        """The identity of the weights a request's K/V are computed with, for prefix-cache keys: its adapter
        (or composition) version key, names the stored versions and weights, and every member's count of
        overwrites/deletes in this process (a reloaded adapter never shares keys with the one it replaced)."""
        if request.adapter_version is None:
            return ""
        names = [m.name for m in request.composition.members] if request.composition is not None else [request.adapter]
        return request.adapter_version + "#" + ",".join(str(self._generations.get(n, 0)) for n in names)

    def _observe_cache(self) -> None:
        if self._metrics is None:
            return
        stats, blocks = self.scheduler.stats, self.scheduler.blocks
        self._metrics.observe_kv_cache(stats.queried_tokens, stats.hit_tokens, stats.preemptions,
                                       blocks.num_used, blocks.usable)

    def _append(self, tracked: _Tracked, token: int, logprob) -> None:
        request, params = tracked.request, tracked.request.params
        request.output_token_ids.append(token)
        reason = None
        is_stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        text = "" if is_stop_token else tracked.detokenizer.add([token])
        grammar_done = tracked.sampling.matcher is not None and tracked.sampling.matcher.is_terminated()
        if is_stop_token or tracked.detokenizer.stopped or grammar_done:
            reason = "stop"
        elif len(request.output_token_ids) >= tracked.max_tokens or request.num_tokens >= self.max_seq_len:
            reason = "length"
        if reason is not None:
            text += tracked.detokenizer.add([], final=True)
        tracked.emit(RequestOutput(request.request_id, [token], text, [logprob] if logprob else None,
                                   reason is not None, reason, len(request.prompt_token_ids),
                                   len(request.output_token_ids), prompt_logprobs=tracked.take_prompt_logprobs(),
                                   cached_tokens=request.num_cached_prompt_tokens))
        if reason is not None:
            self._retire(tracked, reason)

    def _finish(self, tracked: _Tracked, reason: str, error: str | None = None) -> None:
        """End a request without a new token (abort, error, a prompt-only request) and tell its caller."""
        request = tracked.request
        tracked.emit(RequestOutput(request.request_id, [], "", None, True, reason, len(request.prompt_token_ids),
                                   len(request.output_token_ids), error,
                                   prompt_logprobs=None if error else tracked.take_prompt_logprobs(),
                                   cached_tokens=request.num_cached_prompt_tokens))
        self._retire(tracked, reason)

    def _retire(self, tracked: _Tracked, reason: str) -> None:
        request = tracked.request
        request.finish_reason = reason
        if request.status is not Status.FINISHED:
            self.scheduler.remove(request)
        self.adapters.release(request)
        self._tracked.pop(request.request_id, None)

    # ---- offline use (benchmarks, tests): drive the loop in the calling thread ----

    def generate(self, requests: list[Request]) -> dict[str, list[RequestOutput]]:
        """Run requests to completion without the engine thread; returns every request's outputs."""
        if self._thread is not None:
            raise RuntimeError("generate() drives the engine itself; do not call it while the engine thread runs")
        outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        for request in requests:
            self.submit(request, outputs[request.request_id].append)
        self._drain_inbox()
        while self.scheduler.has_work():
            self._wake.clear()
            if self.step():  # only requests waiting for their adapters: sleep until a load or copy ends
                self._wake.wait(IDLE_RECHECK_S)
        return outputs

    # ---- adapters (any thread) ----

    @property
    def adapter_store(self) -> AdapterStore:
        return self.adapters.store

    def validate_adapter(self, path, name: str) -> None:
        """Raise adapters.format.AdapterError unless the adapter at path can be served on this base."""
        self.adapters.validate(path, name)
        if check_saved_head(path, lm_head_weight(self.loaded.model)):  # AdapterHub: equal to ours, or refused
            log.info("adapter %s: its saved prediction head equals the base's lm_head; the base's is served", name)

    def invalidate_adapter(self, name: str) -> None:
        """The stored adapter changed or went away: new requests must not use cached copies (nor K/V cached
        for its old version)."""
        self._generations[name] = self._generations.get(name, 0) + 1
        self.adapters.invalidate(name)
        self._wake.set()

    @property
    def metrics(self):
        return self._metrics

    @metrics.setter
    def metrics(self, metrics) -> None:
        self._metrics = metrics
        self.adapters.metrics = metrics

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + self._inbox.qsize()


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (loaded.hf_config, getattr(loaded, "generation_config", None)):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    tokenizer_eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return frozenset(ids)


def adapter_slot_plan(loaded: LoadedModel, config: EngineConfig) -> SlotPlan:
    """How many device slots this model gets under the config (server.engine.slot_sizing)."""
    per_slot = bytes_per_slot(linear_shapes(loaded.model), config.max_lora_rank, slot_itemsize(loaded.model))
    return plan_slots(per_slot, budget_bytes=config.adapter_slot_bytes, max_batch=config.max_batch,
                      max_waiting=config.max_waiting, requested=config.max_adapter_slots)


def kv_pool_blocks(config: EngineConfig, args, dtype: torch.dtype, max_seq_len: int) -> int:
    """Blocks of the paged KV pool (block 0 the null block): as many as --kv-cache-bytes holds, but no more than
    --max-batch full-length rows use (a small model would otherwise allocate the whole budget for nothing)."""
    if config.kv_block_size < 1 or config.kv_block_size & (config.kv_block_size - 1):
        raise ValueError(f"--kv-block-size must be a power of two, got {config.kv_block_size}")
    per_block = KVCache.bytes_per_block(args.num_layers, args.num_kv_heads, args.head_dim, config.kv_block_size, dtype)
    by_bytes = config.kv_cache_bytes // per_block
    if by_bytes < 2:
        raise ValueError(f"--kv-cache-bytes {config.kv_cache_bytes} holds {by_bytes} blocks of {per_block} bytes; "
                         "the pool needs at least 2")
    return min(by_bytes, config.max_batch * -(-max_seq_len // config.kv_block_size) + 1)


def _make_pool(loaded: LoadedModel, config: EngineConfig, device: torch.device,
               store: AdapterStore | None) -> AdapterPool:
    """Wrap the model's linears with adapter slots (once per model) and build the tiers over the store."""
    model = loaded.model
    slots = adapter_slot_plan(loaded, config)
    log.info("adapter slots: %d of %.1f MB at rank %d (%s; %.0f MB)", slots.num_slots, slots.bytes_per_slot / 1e6,
             config.max_lora_rank, slots.reason, slots.total_bytes / 1e6)
    size = (slots.num_slots, config.max_lora_rank)
    installed = getattr(model, "adapter_install", None)
    if installed is not None and installed[2] != size:
        uninstall_adapter_layers(model)
        installed = None
    if installed is None:
        installed = install_adapter_layers(model, *size) + (size,)
        model.adapter_install = installed
    mapping, layers = installed[0], installed[1]
    if store is None:
        root = config.adapter_dir or str(default_cache_dir() / "adapters")
        store = AdapterStore(Path(root))
    policy = MergePolicy(config.merge_threshold, config.unmerge_threshold, config.merge_patience,
                         config.merge_min_batch) if config.merge_threshold <= 1.0 else None
    return AdapterPool(store, BaseSpec.from_hf_config(loaded.hf_config, loaded.name), layers, mapping,
                       num_slots=slots.num_slots, max_rank=config.max_lora_rank,
                       cpu_cache_bytes=config.adapter_cache_bytes, dtype=loaded.dtype, device=device,
                       merge_policy=policy)
