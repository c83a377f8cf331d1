"""One ``--engine vllm`` request's output stream, built from vLLM's token ids exactly as the native engine builds it.

:class:`VllmRequestStream` mirrors ``Engine._append``: the same stop-token rule (``stop_token_ids``, and EOS
unless ``ignore_eos``), the same :class:`~server.engine.detokenizer.IncrementalDetokenizer` with the stop
strings (text held back until final, nothing past a stop), the same ``length`` rule, one
:class:`~server.engine.request.RequestOutput` per token. When a stop string ends the request here, vLLM is told
to abort it. Events arrive from the client's reader thread through :func:`dispatch`, called in the stream's
event loop (``call_soon_threadsafe``, once per worker line).
"""
from __future__ import annotations

import asyncio
import time

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.request import Request, RequestError, RequestOutput, TokenLogprob
from server.engine.streams import QueuedOutputs


def dispatch(items) -> None:
    """Hand (stream, event) pairs to their streams (in the streams' event loop)."""
    for stream, event in items:
        stream.on_event(event)


class VllmRequestStream(QueuedOutputs):
    """One request's outputs, built here from vLLM's token ids exactly as ``Engine._append`` builds them."""

    def __init__(self, client, request: Request, max_tokens: int):
        self.client, self.request, self.max_tokens = client, request, max_tokens
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.detokenizer = IncrementalDetokenizer(client.tokenizer, request.params.stop)
        self.finished = self.started = False

    def on_event(self, event: dict) -> None:  # the event loop's thread, from here on
        if self.finished:
            return
        if "error" in event:
            if event.get("refused"):  # vLLM's own LoRA checks refused it before it ran: a client error
                self._end(RequestError(f"vLLM refuses adapter {self.request.adapter!r}: {event['error']}; "
                                       "serve it with --engine native"))
            else:
                self.fail(f"vLLM failed: {event['error']}")
            return
        entries = event.get("logprobs") or [None] * len(event["tokens"])
        for token, entry in zip(event["tokens"], entries):
            if self._append(token, entry):
                if not event["finished"]:
                    self.client.send({"op": "abort", "id": self.request.request_id})
                return
        if event["finished"]:  # vLLM stopped on something of its own (e.g. max_model_len)
            reason = event.get("reason") if event.get("reason") in ("stop", "length", "abort") else "stop"
            self._emit([], self.detokenizer.add([], final=True), None, reason)

    def _append(self, token: int, entry) -> bool:
        request, params = self.request, self.request.params
        request.output_token_ids.append(token)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        self.started = True
        is_stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.client.eos_token_ids)
        text = "" if is_stop_token else self.detokenizer.add([token])
        reason = None
        if is_stop_token or self.detokenizer.stopped:
            reason = "stop"
        elif len(request.output_token_ids) >= self.max_tokens or request.num_tokens >= self.client.max_seq_len:
            reason = "length"
        if reason is not None:
            text += self.detokenizer.add([], final=True)
        logprob = None if entry is None else TokenLogprob(token, entry[0], [(t, lp) for t, lp in entry[1]])
        self._emit([token], text, [logprob] if logprob else None, reason)
        return reason is not None

    def _emit(self, tokens, text, logprobs, reason, error=None) -> None:
        r = self.request
        output = RequestOutput(r.request_id, tokens, text, logprobs, reason is not None, reason,
                               len(r.prompt_token_ids), len(r.output_token_ids), error)
        self._end(output) if reason is not None else self.queue.put_nowait(output)

    def _end(self, item) -> None:
        self.finished = True
        if isinstance(item, RequestOutput):
            self.request.finish_reason = item.finish_reason
        self.client.streams.pop(self.request.request_id, None)
        self.queue.put_nowait(item)

    def fail(self, message: str) -> None:
        if not self.finished:
            self._emit([], "", None, "error", error=message)

    def abort(self) -> None:
        """Cancel the request in vLLM (idempotent; synchronous, so safe in a cancelled task)."""
        if not self.finished:
            self.finished = True
            self.request.finish_reason = "abort"
            self.client.streams.pop(self.request.request_id, None)
            self.client.send({"op": "abort", "id": self.request.request_id})
