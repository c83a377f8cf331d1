"""API keys: inference vs admin scope, 401/403, key files, and what the CLI binds to."""
import logging

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.auth import ADMIN, INFERENCE, KeySet, load_keys, parse_key_file, request_key
from server.cli import parse_args
from server.config import ServerConfig
from tests.api_support import serve, with_config

BASE = "tiny-llama-builtin"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text("# keys for the tests\nfile-inference\n\nadmin file-admin  # ops\ninference file-inference-2\n")
    return path


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory, key_file):
    config = with_config(api_keys=("inf",), admin_keys=("adm",), api_key_file=str(key_file))
    with serve(builtin_model_dir, tmp_path_factory.mktemp("adapters"), config) as (server, engine):
        yield server


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_key_file_and_key_set(key_file, tmp_path):
    keys = parse_key_file(key_file)
    assert keys.inference == {"file-inference", "file-inference-2"} and keys.admin == {"file-admin"}
    merged = load_keys(ServerConfig(api_keys=("a",), admin_keys=("b",), api_key_file=str(key_file)))
    assert merged.scope_of("b") == ADMIN and merged.scope_of("file-admin") == ADMIN
    assert merged.scope_of("a") == INFERENCE and merged.scope_of("nope") is None
    assert not KeySet().enabled
    bad = tmp_path / "bad.txt"
    bad.write_text("superuser key extra\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        parse_key_file(bad)
    assert request_key({"headers": [(b"authorization", b"Bearer  abc ")]}) == "abc"
    assert request_key({"headers": [(b"x-api-key", b"xyz")]}) == "xyz"
    assert request_key({"headers": [(b"authorization", b"Basic abc")]}) is None


def test_missing_or_wrong_key_is_401(live):
    body = {"prompt": "Hi", "max_tokens": 1}
    missing = httpx.post(f"{live.url}/v1/completions", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    assert httpx.post(f"{live.url}/v1/completions", json=body, headers=bearer("wrong")).status_code == 401
    assert httpx.get(f"{live.url}/v1/adapters").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_inference_keys_run_inference_but_not_adapter_management(live):
    for key in ("inf", "file-inference", "file-inference-2"):
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)
        assert client.completions.create(model=BASE, prompt="Hi", max_tokens=2).choices
        assert client.models.list().data[0].id == BASE
        refused = httpx.get(f"{live.url}/v1/adapters", headers=bearer(key))
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert httpx.delete(f"{live.url}/v1/adapters/x", headers=bearer(key)).status_code == 403
    assert httpx.post(f"{live.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                      headers={"X-API-Key": "inf"}).status_code == 200


def test_admin_keys_may_do_everything(live):
    for key in ("adm", "file-admin"):
        assert httpx.get(f"{live.url}/v1/adapters", headers=bearer(key)).json()["data"] == []
        assert httpx.get(f"{live.url}/v1/adapters/nope", headers=bearer(key)).status_code == 404
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)
        assert client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2).choices


def test_health_and_metrics_are_open(live):
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert httpx.get(f"{live.url}/metrics").status_code == 200


class _StubEngine:
    """Just enough engine for the app's start-up and shutdown."""

    model_name, num_running, num_waiting = "stub", 0, 0

    def start(self):
        pass

    def shutdown(self):
        pass


def test_startup_says_when_no_keys_are_configured(caplog):
    with caplog.at_level(logging.INFO, logger="server.api.app"):
        with TestClient(create_app(_StubEngine())):
            pass
        assert "no API keys configured" in caplog.text
        caplog.clear()
        with TestClient(create_app(_StubEngine(), ServerConfig(api_keys=("k",)))) as client:
            assert client.get("/v1/models").status_code == 401
        assert "no API keys configured" not in caplog.text


def test_cli_binds_loopback_without_keys(monkeypatch, key_file):
    for name in ("API_KEYS", "ADMIN_KEYS", "API_KEY_FILE", "HOST", "REQUEST_TIMEOUT"):
        monkeypatch.delenv(f"ADAPTER_SERVER_{name}", raising=False)
    assert parse_args([])[1].host == "127.0.0.1"
    _, config = parse_args(["--api-key", "a", "--admin-key", "b", "--request-timeout", "0"])
    assert config.host == "0.0.0.0" and config.api_keys == ("a",) and config.admin_keys == ("b",)
    assert config.request_timeout is None
    assert parse_args(["--api-key-file", str(key_file)])[1].host == "0.0.0.0"
    assert parse_args(["--api-key", "a", "--host", "127.0.0.1"])[1].host == "127.0.0.1"
    monkeypatch.setenv("ADAPTER_SERVER_ADMIN_KEYS", "x, y")
    assert parse_args([])[1].admin_keys == ("x", "y")
    with pytest.raises(SystemExit):
        parse_args(["--api-key-file", str(key_file) + ".missing"])
