"""`make demo`: train one adapter of every trainer kind on the default model, serve them, score them.

    python -m adapters.demo [--kinds lora,ia3,...] [--server URL] [--threads N] [--max-tokens N]

The kinds (:data:`KINDS`): LoRA, LoRA with a trained lora_B bias (``--lora-bias``), DoRA, IA3, prefix
tuning, prompt tuning, P-tuning and AdapterHub's houlsby, pfeiffer and parallel bottleneck adapters (parallel at
reduction 16), each with the trainer's defaults (``--kinds`` picks some).

The task ("shout"): answer in a short shout -- at most six words, all capitals, ending with "!".
SmolLM2-135M-Instruct never answers that way by itself (it writes ordinary sentences). Training
data: 24 chat rows shipped in ``adapters/demo_data/shout_train.jsonl``; the 12 questions of
``shout_heldout.jsonl`` are never trained on: they give the eval loss and the score, the share of
held-out answers that follow the format (:func:`follows_format`). Each adapter is trained with the
trainer's defaults (the step rule makes 24 rows 30 steps), uploaded to an ``adapter-server`` started
with no ``--model`` (the default model) and a throwaway adapter store, and asked every held-out
question by the chat endpoint, greedily, all at once (96 requests for the seven kinds and the base, in shared
batches). Measured: every kind 11 or 12 of 12, the base 0; 308 s in all, 13 s of it the requests (README).
Without --server the server is started on a free loopback port and stopped at the end; with it,
that server must serve the default model. The exit code is 1 unless every adapter beats the base.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

DATA = Path(__file__).resolve().parent / "demo_data"
TRAIN, HELDOUT = DATA / "shout_train.jsonl", DATA / "shout_heldout.jsonl"
# demo name -> TrainConfig options besides the data (the name is the --kind unless "kind" says otherwise)
KINDS = {"lora": {}, "lora-bias": {"kind": "lora", "lora_bias": True}, "dora": {}, "ia3": {}, "prefix": {},
         "prompt": {}, "ptuning": {},
         # AdapterHub bottleneck adapters (adapters.train_bottleneck); parallel at reduction 16 (width 36): the
         # library's 2 gives width 288, above the demo server's default --max-lora-rank 64
         "houlsby": {}, "pfeiffer": {}, "parallel": {"reduction_factor": 16}}
MAX_WORDS = 6


def follows_format(answer: str) -> bool:
    """A shout: 1-6 words, at least one capital letter and no lower-case one, ending with "!"."""
    text = answer.strip()
    return (text.endswith("!") and 1 <= len(text.split()) <= MAX_WORDS and re.search("[A-Z]", text) is not None
            and re.search("[a-z]", text) is None)


def questions(path: Path = HELDOUT) -> list[str]:
    """The user message of every row (the rows' answers are the targets for the eval loss only)."""
    return [json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def local_server(work: Path):
    """Start an adapter-server on the default model now; yields a function that waits for it and returns its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(port), "--adapter-dir",
                                str(work / "adapters")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> str:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"adapter-server exited; see {work / 'server.log'}:\n"
                                 + (work / "server.log").read_text()[-2000:])
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("adapter-server did not come up in 300 s")
            time.sleep(0.3)

    try:
        yield ready
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def chat(client: httpx.Client, model: str, question: str, max_tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def train_all(work: Path, threads: int, kinds=tuple(KINDS), quantization: str = "none") -> dict:
    """demo name -> TrainResult, each trained with the trainer's defaults (as `adapterctl train` would)."""
    from adapters.train import TrainConfig, train_adapter

    results = {}
    for name in kinds:
        options = dict(KINDS[name])
        kind = options.pop("kind", name)
        flags = "".join(f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in options.items())
        if quantization != "none":
            flags += f" --quantization {quantization}"
        print(f"$ adapterctl train --kind {kind}{flags} --data {TRAIN.name} --eval-data {HELDOUT.name} --out {name} "
              f"--threads {threads}", flush=True)
        result = train_adapter(TrainConfig(kind=kind, data=TRAIN, eval_data=HELDOUT, out=work / name,
                                           threads=threads, progress=False, device="cpu", quantization=quantization,
                                           **options))
        print(f"  {result.steps} steps ({result.epochs:.0f} epochs of {result.num_train} rows) in "
              f"{result.seconds:.0f} s; train loss {result.train_loss_start:.2f} -> {result.train_loss_end:.2f}, "
              f"held-out loss {result.eval_loss_start:.2f} -> {result.eval_loss_end:.2f}", flush=True)
        results[name] = result
    return results


def run(work: Path, threads: int, max_tokens: int, server: str | None, kinds=tuple(KINDS),
        quantization: str = "none") -> int:
    from adapters.train import upload_adapter
    from server.model.default_model import ensure_default_model

    started = time.perf_counter()
    ensure_default_model()  # converted once, before the server and the trainer both want it
    with (local_server(work) if server is None else _running(server)) as ready:
        results = train_all(work, threads, kinds, quantization)
        trained = time.perf_counter()
        url = ready()
        base = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        for kind, result in results.items():
            upload_adapter(result.out, f"shout-{kind}", server=url, overwrite=True)
        models = [base, *(f"shout-{kind}" for kind in results)]
        asked = questions()
        before = time.perf_counter()
        with httpx.Client(base_url=url, timeout=300) as client, ThreadPoolExecutor(len(asked) * len(models)) as pool:
            futures = {(m, q): pool.submit(chat, client, m, q, max_tokens) for m in models for q in asked}
            answers = {key: future.result() for key, future in futures.items()}
        served = time.perf_counter()
    for question in asked:
        print(f"\n{question}")
        for model in models:
            answer = answers[model, question]
            print(f"  {'+' if follows_format(answer) else '-'} {model:22} {answer.strip()!r}")
    scores = {m: sum(follows_format(answers[m, q]) for q in asked) for m in models}
    print("\nscore (held-out answers that are a shout: <= 6 words, all capitals, ending with '!'):")
    for model in models:
        print(f"  {model:22} {scores[model]}/{len(asked)}")
    print(f"time: training {trained - started:.0f} s ({', '.join(f'{k} {r.seconds:.0f} s' for k, r in results.items())}"
          f" in the loop), {len(asked) * len(models)} chat requests {served - before:.1f} s, "
          f"total {time.perf_counter() - started:.0f} s")
    return 0 if all(scores[m] > scores[base] for m in models[1:]) else 1


@contextmanager
def _running(server: str):
    yield lambda: server.rstrip("/").removesuffix("/v1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("ADAPTERCTL_SERVER"),
                        help="a running adapter-server on the default model (default: start one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training (default 1: on a shared 2-core machine two are slower)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    parser.add_argument("--kinds", type=lambda text: tuple(k.strip() for k in text.split(",") if k.strip()),
                        default=tuple(KINDS), help=f"comma-separated, among {','.join(KINDS)} (default: all)")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none",
                        help="train over the base as is (none) or QLoRA-style over a bitsandbytes NF4 copy (nf4); "
                             "the server serves the adapter over its own base either way")
    args = parser.parse_args(argv)
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown or not args.kinds:
        parser.error(f"--kinds {','.join(unknown) or '(none)'}: choose among {','.join(KINDS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("bitsandbytes", "transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="adapter-demo-") as tmp:
        return run(Path(tmp), args.threads, args.max_tokens, args.server, args.kinds, args.quantization)


if __name__ == "__main__":
    sys.exit(main())
