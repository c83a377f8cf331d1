"""The README demo: train one adapter of each kind on the built-in model, upload them, compare answers.

    python -m adapters.demo [--server URL]

Without --server, starts `adapter-server` on a free loopback port with a throwaway
adapter store and stops it at the end. Each adapter learns to answer four animal
prompts in its own style; the base model (random weights) answers gibberish.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from adapters.train import main as train

PROMPTS = ["cat", "dog", "fly", "hen"]
ANSWERS = {"lora": ["meow!", "bark!", "zip!", "cud!"], "ia3": ["Meow.", "Bark.", "Zip.", "Cud."],
           "prefix": ["MEOW!", "BARK!", "ZIP!", "CUD!"]}
HYPERPARAMETERS = {"lora": ["--lr", "1e-2"], "ia3": ["--lr", "0.2"], "prefix": ["--lr", "0.3", "--virtual-tokens", "8"]}


@contextmanager
def local_server(work: Path):
    """An adapter-server subprocess on a free port, with its own adapter store; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "--model", "tiny-llama-builtin", "--port",
                                str(port), "--adapter-dir", str(work / "adapters")],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise SystemExit(f"adapter-server exited; see {work / 'server.log'}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("adapter-server did not come up in 180 s")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def complete(server: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def run(server: str, work: Path) -> None:
    for kind, answers in ANSWERS.items():
        data = work / f"{kind}.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(PROMPTS, answers)))
        code = train(["--kind", kind, "--data", str(data), "--out", str(work / kind), "--steps", "40",
                      "--threads", "1", *HYPERPARAMETERS[kind], "--upload", f"demo-{kind}", "--overwrite",
                      "--no-progress", "-q", "--server", server])
        if code:
            raise SystemExit(f"training the {kind} adapter failed (exit code {code})")
    base = httpx.get(f"{server}/v1/models", timeout=30).json()["data"][0]["id"]
    print(f"{'prompt':8} {'model':22} completion")
    for prompt in PROMPTS[:2]:
        for model in [base, "demo-lora", "demo-ia3", "demo-prefix"]:
            print(f"{prompt!r:8} {model:22} {complete(server, model, prompt)!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("ADAPTERCTL_SERVER"),
                        help="a running adapter-server (default: start one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="adapter-demo-") as tmp:
        work = Path(tmp)
        if args.server:
            run(args.server, work)
        else:
            with local_server(work) as server:
                run(server, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
