"""The first README command's last step, on the tiny model: `adapter-server --model tiny-llama-builtin` serves it.

(With no --model the server serves the default SmolLM2 model: tests/test_default_model.py.)"""
import os
import subprocess
import sys
import time

import httpx

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
