"""What ``--engine vllm`` refuses, what it sends vLLM, and the LoRA snapshots vLLM loads (no vLLM here).

Refused with a 400 that names ``--engine native`` (never silently ignored):

* adapters whose kind is not ``lora`` (IA3, prefix, prompt, P-tuning, DoRA: vLLM serves LoRA only), and LoRAs
  with what vLLM's ``PEFTHelper`` refuses: bias terms (``bias`` other than ``"none"``, ``lora_bias``),
  inits that change the base (PiSSA, OLoRA, LoftQ, CorDA), aLoRA, layer replication, QALoRA, BD-LoRA;
* ``response_format`` (vLLM runs with ``skip_tokenizer_init``: its grammar backends need its tokenizer),
  ``prompt_logprobs``/``echo`` scoring and ``max_tokens: 0`` (prompt-only scoring).

Uploads of those kinds are still stored (and validated against the base as ``--engine native`` does): the
store is an artifact store that a native server may share (``--adapter-dir``), so adapterctl manages the same
adapters whichever engine the server it talks to runs.

LoRA snapshots: vLLM reads an adapter from a path the first time it sees its integer id and caches it by that
id. The store replaces an adapter's directory in place on an overwrite, so each stored *version* (name +
weights sha256) is copied once into a directory of this server's own (checked against the indexed sha256) and
given an id of its own: a request never runs an adapter other than the version it resolved, and an
overwritten adapter is never served from vLLM's cache under its old id.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import threading
import time
from pathlib import Path

from adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME
from adapters.store import AdapterStore
from server.engine.adapter_pool import version_key
from server.engine.request import Request, RequestError

NATIVE = "--engine native"
WHY = "this server runs --engine vllm, which serves LoRA adapters only"
FILES = (CONFIG_NAME, WEIGHTS_NAME)
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


def lora_refusal(config: dict) -> str | None:
    """Why vLLM cannot serve this PEFT LoRA config (the checks of vLLM's PEFTHelper), or None."""
    if config.get("use_dora"):
        return "it is a DoRA adapter (use_dora)"
    if (config.get("bias") or "none") != "none":
        return f"it trains bias terms (bias={config['bias']!r})"
    if config.get("lora_bias"):
        return "it has lora_B bias terms (lora_bias)"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        return f"its init_lora_weights={init!r} changes the base weights"
    for field, what in (("alora_invocation_tokens", "activated LoRA (aLoRA)"), ("layer_replication", "layer "
                        "replication"), ("use_qalora", "QALoRA"), ("use_bdlora", "block-diagonal LoRA")):
        if config.get(field):
            return f"it uses {what}"
    return None


def refused(name: str, why: str) -> RequestError:
    return RequestError(f"adapter {name!r} cannot be served here: {why}; {WHY}. Serve it with {NATIVE}")


def check_supported(params) -> None:
    """Refuse (RequestError, a 400 naming --engine native) what vLLM's side cannot do for these parameters."""
    if params.response_format is not None:
        raise RequestError(f"response_format is not supported with --engine vllm; use {NATIVE}")
    if params.prompt_logprobs is not None:
        raise RequestError(f"prompt logprobs (echo with logprobs, prompt_logprobs) are not supported with "
                           f"--engine vllm; use {NATIVE}")
    if params.max_tokens == 0:
        raise RequestError(f"max_tokens 0 (scoring the prompt only) is not supported with --engine vllm; use {NATIVE}")


def vllm_params(request: Request, max_tokens: int, eos_token_ids: frozenset[int]) -> dict:
    """The vLLM SamplingParams fields of ``request`` (stop strings stay ours: the server detokenizes)."""
    p = request.params
    stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
    params = {"max_tokens": max_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
              "min_p": p.min_p, "seed": p.seed, "presence_penalty": p.presence_penalty,
              "frequency_penalty": p.frequency_penalty, "repetition_penalty": p.repetition_penalty,
              "min_tokens": p.min_tokens, "ignore_eos": p.ignore_eos, "stop_token_ids": sorted(stop_ids),
              "logprobs": p.logprobs}
    if p.logit_bias:
        params["logit_bias"] = {int(t): float(b) for t, b in p.logit_bias}
    return params


class LoraSnapshots:
    """Stored LoRA versions -> (vLLM int id, private copy); refusals cached per version. Thread-safe."""

    def __init__(self, store: AdapterStore, root: Path, metrics_of=lambda: None):
        self.store, self.root, self.metrics_of = store, Path(root), metrics_of
        self._ids = itertools.count(1)
        self._known: dict[str, tuple[int, Path, str | None]] = {}
        self._lock = threading.Lock()

    def resolve(self, record) -> list:
        """``[name, int id, path]`` of the stored LoRA ``record`` for the worker; raises RequestError if refused."""
        if record.kind != "lora":
            raise refused(record.name, f"its kind is {record.kind}")
        version = version_key(record)
        with self._lock:
            known = self._known.get(version)
            metrics = self.metrics_of()
            if known is None:
                started = time.monotonic()
                known = self._known[version] = self._snapshot(record)
                if metrics is not None:
                    metrics.adapter_cache_misses.inc()
                    metrics.adapter_loads.inc()
                    metrics.adapter_load_seconds.observe(time.monotonic() - started)
            elif metrics is not None:
                metrics.adapter_cache_hits.inc()
        lora_id, path, why = known
        if why is not None:
            raise refused(record.name, why)
        return [record.name, lora_id, str(path)]

    def _snapshot(self, record) -> tuple[int, Path, str | None]:
        lora_id = next(self._ids)
        target = self.root / str(lora_id)
        target.mkdir(parents=True)
        source = self.store.path(record.name)
        for name in FILES:
            shutil.copyfile(source / name, target / name)
        digest = hashlib.sha256((target / FILES[1]).read_bytes()).hexdigest()
        if digest != record.sha256:
            shutil.rmtree(target, ignore_errors=True)
            raise RequestError(f"adapter {record.name!r} was replaced while it was being loaded; "
                               "send the request again")
        config = json.loads((target / FILES[0]).read_text(encoding="utf-8"))
        return lora_id, target, lora_refusal(config)
