"""The HF PEFT peer: what a user can do today with PEFT alone, behind the same HTTP API.

All LoRA adapters are loaded into one ``PeftModel`` (``load_adapter``). A worker thread
takes up to ``--max-batch`` waiting requests at a time (static batching: a request that
arrives while a batch runs waits for the next one), left-pads their prompts and calls
PEFT's mixed-adapter ``generate(adapter_names=[...])`` once for the batch (``"__base__"``
for rows without an adapter). Tokens are streamed back per row as ``generate`` produces
them (a batch-aware streamer), so time to first token and inter-token latency are measured
exactly as for the other servers.

It speaks the subset of ``POST /v1/completions`` the load tools use: ``prompt`` (a string
or token ids), ``model`` or ``adapter``, ``max_tokens``, ``ignore_eos``, ``temperature``
(a batch samples with its first request's temperature; 0 = greedy), ``stream`` and
``stream_options.include_usage``. Plus ``GET /health`` and ``GET /v1/models``. LoRA only:
PEFT's mixed batches ignore IA3 ``adapter_names`` and refuse them for prefix tuning.

    python -m loadtest.peers --model DIR --adapters ADAPTERS.json --port 8001 --max-batch 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers.generation.streamers import BaseStreamer

from server.engine import threads as torch_threads

log = logging.getLogger("peft_peer")

BASE_ADAPTER = "__base__"


class BatchFailed(RuntimeError):
    """The ``generate`` call of a request's batch raised; the request fails with this."""


@dataclass
class Job:
    """One request waiting for (or in) a batch; its tokens go to ``events`` on the server's loop."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    ignore_eos: bool
    temperature: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    finished: bool = False

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class _RowStreamer(BaseStreamer):
    """Hands each row's new token to its job; the first ``put`` is the prompt and is skipped."""

    def __init__(self, jobs: list[Job], eos_ids: set[int]):
        self.jobs, self.eos_ids = jobs, eos_ids
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if job.finished:
                continue
            job.tokens.append(token)
            job.emit(token)
            if len(job.tokens) >= job.max_tokens or (not job.ignore_eos and token in self.eos_ids):
                job.finished = True
                job.emit(None)

    def end(self) -> None:
        for job in self.jobs:
            if not job.finished:
                job.finished = True
                job.emit(None)


class PeftBatcher:
    """The worker thread running static batches through PEFT's mixed-adapter ``generate``."""

    def __init__(self, model, tokenizer, max_batch: int, threads: int | None = None):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.threads = threads or torch.get_num_threads()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else []
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, name="peft-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.waiting.put(job)

    def _loop(self) -> None:
        torch_threads.adopt(self.threads)
        while True:
            jobs = [self.waiting.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                self._run(jobs)
            except Exception as exc:  # fail this batch's requests, keep serving
                log.exception("batch of %d failed", len(jobs))
                for job in jobs:
                    if not job.finished:
                        job.finished = True
                        job.emit(BatchFailed(f"{type(exc).__name__}: {exc}"))

    def _run(self, jobs: list[Job]) -> None:
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding
            ids[i, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids):] = 1
        new_tokens = max(j.max_tokens for j in jobs)
        temperature = jobs[0].temperature
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens if any(j.ignore_eos for j in jobs) else None,
                                adapter_names=[j.adapter or BASE_ADAPTER for j in jobs], pad_token_id=self.pad_id,
                                streamer=_RowStreamer(jobs, self.eos_ids), **sampling)
        self.batches += 1


def load_peft_model(model_dir: Path, adapters: dict[str, str], dtype: torch.dtype):
    """The base with every adapter of ``adapters`` (name -> PEFT dir) loaded, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    start = time.perf_counter()
    names = list(adapters)
    if names:
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        model.eval()
    log.info("loaded %d adapters in %.1f s", len(names), time.perf_counter() - start)
    return model, tokenizer


def create_app(batcher: PeftBatcher, model_name: str, adapters: set[str]):
    """The FastAPI app: ``POST /v1/completions``, ``GET /health``, ``GET /v1/models``."""
    app = FastAPI(title="peft-peer")
    tokenizer = batcher.tokenizer

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                            status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "waiting": batcher.waiting.qsize(), "batches": batcher.batches}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "peft-peer"}
                                           for n in [model_name, *sorted(adapters)]]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        name = body.get("adapter") or body.get("model")
        adapter = None if name in (None, "", model_name) else name
        if adapter is not None and adapter not in adapters:
            return error(404, f"model {name!r} not found")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt_ids = tokenizer(prompt).input_ids
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt_ids = list(prompt)
        else:
            return error(400, "prompt must be a string or a list of token ids")
        max_tokens = int(body.get("max_tokens") or 16)
        job = Job(prompt_ids, adapter, max_tokens, bool(body.get("ignore_eos")), float(body.get("temperature", 1.0)),
                  asyncio.get_running_loop())
        batcher.submit(job)
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        model = adapter or model_name
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))

        def usage() -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(job.tokens),
                    "total_tokens": len(prompt_ids) + len(job.tokens)}

        async def texts():
            """Text deltas as tokens come (an incomplete UTF-8 tail is held back)."""
            emitted = 0
            while True:
                item = await job.events.get()
                if isinstance(item, BatchFailed):
                    raise item
                final = item is None
                text = tokenizer.decode(job.tokens, skip_special_tokens=True)
                if not final and text.endswith("\ufffd"):
                    continue
                if len(text) > emitted:
                    yield text[emitted:], final
                    emitted = len(text)
                elif final:
                    yield "", True
                if final:
                    return

        if not body.get("stream"):
            try:
                text = "".join([delta async for delta, _ in texts()])
            except BatchFailed as exc:
                return error(500, f"generation failed: {exc}")
            return {"id": response_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                    "usage": usage()}

        def sse(payload: dict) -> bytes:
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        async def events():
            try:
                async for delta, final in texts():
                    yield sse({"id": response_id, "object": "text_completion", "created": created, "model": model,
                               "choices": [{"index": 0, "text": delta, "logprobs": None,
                                            "finish_reason": "length" if final else None}]})
                if usage_wanted:
                    yield sse({"id": response_id, "object": "text_completion", "created": created, "model": model,
                               "choices": [], "usage": usage()})
            except BatchFailed as exc:
                yield sse({"error": {"message": f"generation failed: {exc}", "type": "server_error", "code": 500}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="HF checkpoint directory")
    parser.add_argument("--adapters", type=Path, help="JSON file {name: PEFT adapter dir}; LoRA only")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    adapters = json.loads(args.adapters.read_text()) if args.adapters else {}
    with torch_threads.serial() as threads:  # like our server: the batcher thread's OpenMP team is the only one
        model, tokenizer = load_peft_model(args.model, adapters, getattr(torch, args.dtype))
    batcher = PeftBatcher(model, tokenizer, args.max_batch, threads=threads)
    app = create_app(batcher, args.model.name, set(adapters))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
