"""The first README command's last step, on the tiny model: `adapter-server --model tiny-llama-builtin` serves it.

(With no --model the server serves the default SmolLM2 model: tests/test_default_model.py.)"""
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.server_harness import free_port


def test_adapter_server_starts_on_builtin_model_and_reports_memory(tmp_path):
    port = free_port()
    env = {**os.environ, "ADAPTER_SERVER_CACHE": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "--model", "tiny-llama-builtin", "--port", str(port),
                                "--max-batch", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        body = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                          json={"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}).json()
        assert body["model"] == "tiny-llama-builtin" and body["usage"]["completion_tokens"] == 4
        assert (tmp_path / "models" / "tiny-llama-builtin" / "model.safetensors").exists()
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "MiB resident" in output
    assert "no API keys configured" in output


@pytest.mark.parametrize("argv, env, expected", [
    ([], None, "fair"),                                  # the default
    (["--admission", "fifo"], None, "fifo"),
    ([], "fifo", "fifo"),                                # ADAPTER_SERVER_ADMISSION
    (["--admission", "fair"], "fifo", "fair"),           # the flag wins over the environment
])
def test_admission_flag(monkeypatch, argv, env, expected):
    from server.cli import parse_args
    from server.config import EngineConfig

    for name in ("API_KEYS", "ADMIN_KEYS", "API_KEY_FILE", "ADMISSION"):
        monkeypatch.delenv(f"ADAPTER_SERVER_{name}", raising=False)
    if env is not None:
        monkeypatch.setenv("ADAPTER_SERVER_ADMISSION", env)
    assert parse_args(argv)[0].admission == expected
    assert EngineConfig().admission == "fair"


def test_an_unknown_admission_flag_is_refused(capsys):
    from server.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--admission", "lifo"])
    assert "invalid choice: 'lifo'" in capsys.readouterr().err


def test_an_unknown_admission_in_the_environment_is_refused(monkeypatch, capsys):
    from server.cli import parse_args

    monkeypatch.setenv("ADAPTER_SERVER_ADMISSION", "lifo")
    with pytest.raises(SystemExit):
        parse_args([])
    assert "must be one of fair, fifo, got 'lifo'" in capsys.readouterr().err
