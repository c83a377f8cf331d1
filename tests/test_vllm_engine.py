"""``adapter-server --engine vllm`` against ``--engine native``: the same greedy tokens for the base and a LoRA.

Two real servers on the tiny built-in model (fp32 both, one shared adapter store), the LoRA uploaded with
adapterctl to the vLLM one, every request through the openai client. The API exposes no raw token ids, so
"the same tokens" is checked through what it does expose, all of which a differing token would change: the
text, the per-token strings, and each token's logprob (within 1e-4: vLLM's CPU kernels sum in another order,
the measured differences are ~1e-6) with its top-3 alternatives. Also: base and LoRA rows batched together
in vLLM give the solo answers, stop strings cut the text where native cuts it, and IA3 (stored: the store is
shared) is refused with a 400 naming ``--engine native``, as are compositions, response_format and prompt
scoring.

Skipped when no python with vLLM is found (``make install-vllm``; ``ADAPTER_SERVER_VLLM_PYTHON`` points
elsewhere), except the flag checks, which need no vLLM. The vLLM worker starts in ~40 s on the 2-core
machine; the module takes about a minute and a half.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loadtest.servers import ServerProcess, free_port
from server.vllm_engine.client import vllm_python

pytestmark = pytest.mark.timeout(900)
MODEL = "tiny-llama-builtin"
PROMPTS = ["Hello", "The capital of France is", "1, 2, 3,", "zebra quartz"]
TOKENS = 16


def _python_with_vllm() -> Path | None:
    try:
        python = vllm_python()
    except FileNotFoundError:
        return None
    probe = subprocess.run([str(python), "-I", "-c", "import importlib.util as u, sys; "
                            "sys.exit(u.find_spec('vllm') is None)"], capture_output=True, timeout=60)
    return python if probe.returncode == 0 else None


PYTHON = _python_with_vllm()


def _server(name: str, engine: str, cache: Path, store: Path, logs: Path) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "--model", MODEL, "--engine", engine, "--dtype", "float32",
            "--port", str(port), "--adapter-dir", str(store), "--max-batch", "4", "--max-seq-len", "256",
            "--vllm-python", str(PYTHON)]
    env = {"ADAPTER_SERVER_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return ServerProcess(name, argv, port, logs / f"{name}.log", env=env, startup_timeout=600, base_model=MODEL)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if PYTHON is None:
        pytest.skip("no python with vLLM (make install-vllm, or point ADAPTER_SERVER_VLLM_PYTHON at one)")
    from server.model.builtin import ensure_builtin_model
    from tests.peft_adapters import make_ia3, make_lora

    root = tmp_path_factory.mktemp("vllm")
    base = ensure_builtin_model(root / "cache")  # built once here, before two servers look for it
    adapters = {"lora": make_lora(base, root / "lora", seed=3), "ia3": make_ia3(base, root / "ia3", seed=4)}
    vllm = _server("vllm", "vllm", root / "cache", root / "store", root)
    native = _server("native", "native", root / "cache", root / "store", root)
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once: the vLLM worker takes ~40 s
            for started in [pool.submit(s.start) for s in (vllm, native)]:
                started.result()
        for name, path in adapters.items():  # adapterctl against the vLLM server; the store is shared
            done = subprocess.run([sys.executable, "-m", "adapters.cli", "--server", vllm.url, "upload", str(path),
                                   "--name", f"my-{name}"], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        yield {"vllm": vllm, "native": native}
    finally:
        for s in (vllm, native):
            s.stop()


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _greedy(server, prompt: str, adapter: str | None, **extra) -> dict:
    body = {"ignore_eos": True, **({"adapter": adapter} if adapter else {}), **extra}
    choice = _client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=TOKENS, temperature=0,
                                                logprobs=3, extra_body=body).choices[0]
    lp = choice.logprobs
    return {"text": choice.text, "tokens": lp.tokens, "logprobs": lp.token_logprobs,
            "top": [sorted(t.values(), reverse=True) for t in lp.top_logprobs], "finish": choice.finish_reason}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got["text"] == want["text"] and got["tokens"] == want["tokens"], what
    assert len(got["tokens"]) == TOKENS and got["finish"] == want["finish"] == "length", what
    assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-4), what
    for a, b in zip(got["top"], want["top"]):
        assert a == pytest.approx(b, abs=1e-4), what


@pytest.mark.parametrize("adapter", [None, "my-lora"])
def test_greedy_tokens_equal_native(servers, adapter):
    for prompt in PROMPTS:
        _assert_same(_greedy(servers["vllm"], prompt, adapter), _greedy(servers["native"], prompt, adapter),
                     f"{adapter or 'base'}: {prompt!r}")


def test_the_lora_changes_the_output(servers):
    assert any(_greedy(servers["vllm"], p, None)["text"] != _greedy(servers["vllm"], p, "my-lora")["text"]
               for p in PROMPTS)


def test_base_and_lora_rows_batched_together_equal_solo(servers):
    from openai import AsyncOpenAI

    async def batch():
        client = AsyncOpenAI(base_url=servers["vllm"].url + "/v1", api_key="unused", max_retries=0)
        calls = [client.completions.create(model=MODEL, prompt=p, max_tokens=TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True, **({"adapter": a} if a else {})})
                 for p in PROMPTS for a in (None, "my-lora")]
        try:
            return [r.choices[0].text for r in await asyncio.gather(*calls)]
        finally:
            await client.close()

    solo = [_greedy(servers["native"], p, a)["text"] for p in PROMPTS for a in (None, "my-lora")]
    assert asyncio.run(batch()) == solo


def test_stop_strings_and_streaming_match_native(servers):
    want = _greedy(servers["native"], PROMPTS[1], "my-lora")["text"]
    stop = want[5:7]  # two characters from inside the native text: the text ends before them
    texts = {}
    for name in ("vllm", "native"):
        stream = _client(servers[name]).completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=TOKENS,
                                                          temperature=0, stop=[stop], stream=True,
                                                          extra_body={"adapter": "my-lora", "ignore_eos": True})
        texts[name] = "".join(c.choices[0].text for c in stream if c.choices)
    assert texts["vllm"] == texts["native"] == want[:want.index(stop)]


@pytest.mark.parametrize("case", ["ia3", "composition", "response_format", "echo_logprobs"])
def test_refused_with_a_400_naming_engine_native(servers, case):
    import openai

    kwargs = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    if case == "ia3":
        kwargs["extra_body"] = {"adapter": "my-ia3"}
    elif case == "composition":
        kwargs["extra_body"] = {"adapters": ["my-lora", "my-ia3"]}
    elif case == "response_format":
        kwargs["extra_body"] = {"response_format": {"type": "json_object"}}
    else:
        kwargs.update(echo=True, logprobs=1, max_tokens=0)
    with pytest.raises(openai.BadRequestError) as info:
        _client(servers["vllm"]).completions.create(**kwargs)
    assert "--engine native" in str(info.value)
    _client(servers["native"]).completions.create(**kwargs)  # the native server serves it


@pytest.mark.parametrize("flags, message", [(["--ray"], "--engine vllm and --ray"),
                                            (["--vllm-python", "/nonexistent/python"], "make install-vllm")])
def test_engine_vllm_flag_errors(flags, message):
    """Runs without vLLM: both are refused while parsing the flags, before anything is loaded."""
    done = subprocess.run([sys.executable, "-m", "server.cli", "--engine", "vllm", *flags], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_dead_worker_makes_health_and_requests_503(servers):
    """Last in the module (it kills the vLLM server's worker): /health and requests answer 503, not 200 / a hang."""
    import os
    import signal
    import time

    import httpx

    vllm = servers["vllm"]
    children = subprocess.run(["pgrep", "-P", str(vllm.proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the vLLM server has no worker process"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while httpx.get(f"{vllm.url}/health").status_code != 503:
        assert time.monotonic() < deadline, "/health still answers 200 with the worker dead"
        time.sleep(0.2)
    assert "vLLM worker exited" in httpx.get(f"{vllm.url}/health").json()["reason"]
    response = httpx.post(f"{vllm.url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2},
                          timeout=30)
    assert response.status_code == 503 and "restart the server" in response.text, response.text
    deadline = time.monotonic() + 20
    while True:  # the worker's own vLLM processes (its session) went with it (SIGKILLed; reaped by init)
        left = [p for pid in children for p in subprocess.run(["ps", "-o", "pid=,stat=", "-s", pid], capture_output=True,
                                                               text=True).stdout.splitlines() if "Z" not in p.split()[1]]
        if not left:
            break
        assert time.monotonic() < deadline, f"vLLM processes {left} outlived their worker"
        time.sleep(0.5)
