"""`make fuzz`: schemathesis over the server's own /openapi.json; any 5xx answer fails the run.

Starts ``adapter-server --model tiny-llama-builtin`` on a free loopback port with a temporary adapter
store (so the admin endpoints it fuzzes cannot touch a real one) and no API keys, waits for /health,
then runs ``st run URL/openapi.json --checks not_a_server_error`` with every phase (examples,
coverage, fuzzing, stateful) and stops the server. Exit status: schemathesis's (0 when no operation
got a server error). Extra arguments after ``--`` go to ``st run`` as they are, e.g.
``python -m loadtest.fuzz --max-examples 200 -- --include-path /v1/chat/completions``.

Needs the ``fuzz`` extra (``pip install -e '.[fuzz]'``; ``make fuzz`` installs it).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PHASES = "examples,coverage,fuzzing,stateful"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fuzz: the server exited with status {proc.returncode} before answering /health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"fuzz: the server did not answer /health within {timeout:.0f} s")


def st_command(url: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    if importlib.util.find_spec("schemathesis") is None:
        raise SystemExit("fuzz: schemathesis is not installed; pip install -e '.[fuzz]'")
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--phases", args.phases,
               "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--workers", str(args.workers),
               "--request-timeout", str(args.request_timeout), "--generation-database", "none", "--no-color"]
    if args.max_time:
        command += ["--max-time", str(args.max_time)]
    return command + extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=100, help="test cases per operation and phase")
    parser.add_argument("--seed", type=int, default=0, help="schemathesis/hypothesis seed (reproducible runs)")
    parser.add_argument("--phases", default=PHASES)
    # one worker by default: with threads, hypothesis's ast.parse of lambdas can fail on CPython 3.11
    # ("SystemError: AST constructor recursion depth mismatch"), a runtime error of the run, not of the server
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-time", type=float, default=None, help="time budget of the whole run, seconds")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--max-seq-len", type=int, default=128, help="the server's KV length (short: fast runs)")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="adapter-server-fuzz-") as tmp:
        server = [sys.executable, "-m", "server.cli", "--model", "tiny-llama-builtin", "--adapter-dir",
                  os.path.join(tmp, "adapters"), "--host", "127.0.0.1", "--port", str(port),
                  "--max-seq-len", str(args.max_seq_len), "--max-batch", "8", "--log-level", "warning"]
        # no keys, no load root, no other flags from the environment; the model cache stays shared
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ADAPTER_SERVER_") or k == "ADAPTER_SERVER_CACHE"}
        proc = subprocess.Popen(server, env=env)
        try:
            wait_healthy(url, proc, args.startup_timeout)
            command = st_command(url, args, extra)
            print("fuzz:", " ".join(command), flush=True)
            started = time.monotonic()
            status = subprocess.call(command, cwd=tmp)  # its report folder, if any, goes with the temp dir
            print(f"fuzz: schemathesis exited {status} after {time.monotonic() - started:.0f} s", flush=True)
            return status
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
