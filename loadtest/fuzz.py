"""`make fuzz`: schemathesis over the server's own /openapi.json; any 5xx answer fails the run.

Starts ``adapter-server --model tiny-llama-builtin`` on a free loopback port with a temporary adapter
store (so the admin endpoints it fuzzes cannot touch a real one) and a key file of two tenants' keys
(``KEYS``: the operator, and tenant ``acme``'s admin and inference keys), waits for /health, then runs
``st run URL/openapi.json --checks not_a_server_error`` with every phase (examples, coverage, fuzzing,
stateful) once per key of ``--keys`` (default: the operator's, then acme's admin key: the tenant
endpoints as a tenant sees them) and stops the server. Exit status: the first nonzero of schemathesis's
(0 when no operation got a server error on any pass). The server's log (access log included) is kept in
``--work`` so a request the client gave up on can be looked up there.

Why ``--max-seq-len 32 --max-batch 64`` (issue 25.7): a request may ask for 64 sequences (``MAX_SEQUENCES``:
prompts x n) of up to the whole context each, and a fuzzer finds that request. At ``--max-seq-len 128
--max-batch 8`` the server answered 4 prompts x n=16 with max_tokens 124 in 189 s (200 OK, load average
6-8 on the 2-core machine), and a chat with n=16 in 47-54 s: past the client's 60 s timeout, so the run
recorded "no answer" though the server answered. At 32 and 64 (every sequence of one request in one batch)
the same two took 6.1 and 6.7 s. A whole ``make fuzz`` (2026-12-03, load average 6-10 from other jobs): 2,808
cases per pass, none over the 60 s timeout, exit 0 on both passes (462 s with the operator's key, 306 s with
acme's admin key); the server log held 200/400/403/404/405 answers and no 5xx. Extra arguments after ``--`` go to ``st run`` as they are, e.g.
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
KEYS = {"operator": ("admin", None, "sk-fuzz-operator"), "acme-admin": ("admin", "acme", "sk-fuzz-acme-admin"),
        "acme": ("inference", "acme", "sk-fuzz-acme")}  # name -> (role, tenant, key)


def key_file(path: str) -> str:
    with open(path, "w") as f:
        for role, tenant, key in KEYS.values():
            f.write(f"{role} {key}" + (f" tenant={tenant}" if tenant else "") + "\n")
    return path


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


def st_command(url: str, args: argparse.Namespace, extra: list[str], key: str | None = None) -> list[str]:
    if importlib.util.find_spec("schemathesis") is None:
        raise SystemExit("fuzz: schemathesis is not installed; pip install -e '.[fuzz]'")
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--phases", args.phases,
               "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--workers", str(args.workers),
               "--request-timeout", str(args.request_timeout), "--generation-database", "none", "--no-color"]
    if args.max_time:
        command += ["--max-time", str(args.max_time)]
    if key:
        command += ["--header", f"Authorization: Bearer {key}"]
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
    parser.add_argument("--max-seq-len", type=int, default=32, help="the server's context: bounds the tokens of "
                        "one fuzzed sequence (module docstring)")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's rows: a request's 64 sequences "
                        "run in one batch (module docstring)")
    parser.add_argument("--keys", default="operator,acme-admin", help=f"passes, one per key: {', '.join(KEYS)}")
    parser.add_argument("--work", default=None, help="keep the server log and key file here (default: a temp dir)")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    passes = [k.strip() for k in args.keys.split(",") if k.strip()]
    unknown = [k for k in passes if k not in KEYS]
    if unknown:
        parser.error(f"unknown key {unknown[0]!r}; choose from {', '.join(KEYS)}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="adapter-server-fuzz-") as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        server = [sys.executable, "-m", "server.cli", "--model", "tiny-llama-builtin", "--adapter-dir",
                  os.path.join(tmp, "adapters"), "--host", "127.0.0.1", "--port", str(port),
                  "--max-seq-len", str(args.max_seq_len), "--max-batch", str(args.max_batch),
                  "--api-key-file", key_file(os.path.join(work, "keys.txt")), "--log-level", "info"]
        # no other keys, no load root, no other flags from the environment; the model cache stays shared
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ADAPTER_SERVER_") or k == "ADAPTER_SERVER_CACHE"}
        log_path = os.path.join(work, "server.log")
        print(f"fuzz: server log {log_path}", flush=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(server, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, args.startup_timeout)
            statuses = []
            for name in passes:
                command = st_command(url, args, extra, KEYS[name][2])
                print(f"fuzz: pass with the {name} key:", " ".join(command), flush=True)
                started = time.monotonic()
                status = subprocess.call(command, cwd=tmp)  # its report folder, if any, goes with the temp dir
                print(f"fuzz: schemathesis exited {status} after {time.monotonic() - started:.0f} s ({name} key)",
                      flush=True)
                statuses.append(status)
            return next((s for s in statuses if s), 0)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

if __name__ == "__main__":
    sys.exit(main())
