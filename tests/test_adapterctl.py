"""adapterctl as a subprocess against a real server: upload, list, show, delete, errors and exit codes."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.api_support import peft_lora, serve, with_config
from tests.server_harness import free_port

ADMIN_KEY = "ctl-admin"


def adapterctl_command() -> list[str]:
    script = Path(sys.executable).parent / "adapterctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "adapters.cli"]


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    config = with_config(admin_keys=(ADMIN_KEY,), api_keys=("ctl-inference",))
    with serve(builtin_model_dir, tmp_path_factory.mktemp("adapters"), config) as (server, engine):
        yield server


@pytest.fixture(scope="module")
def lora(builtin_model_dir):
    return peft_lora(str(builtin_model_dir), seed=5)


def ctl(live, *args, key: str | None = ADMIN_KEY, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERCTL_")}
    environment.update(env or {})
    command = adapterctl_command() + ["--server", live.url] if live else adapterctl_command()
    if key:
        command += ["--api-key", key]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=120, env=environment)


def refused(result: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapterctl: ") and fragment in lines[0], result.stderr


def test_upload_list_show_delete(live, lora, tmp_path):
    uploaded = ctl(live, "upload", str(lora), "--name", "ctl-one")
    assert uploaded.returncode == 0, uploaded.stderr
    assert uploaded.stdout.startswith("uploaded ctl-one (lora,")
    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(lora, arcname="adapter")
    assert ctl(live, "upload", str(archive), "--name", "ctl-two").returncode == 0

    listed = ctl(live, "list")
    assert listed.returncode == 0
    header, *rows = listed.stdout.strip().splitlines()
    assert header.split() == ["NAME", "KIND", "RANK", "TARGETS", "SIZE", "CREATED"]
    assert [r.split()[:3] for r in rows] == [["ctl-one", "lora", "4"], ["ctl-two", "lora", "4"]]
    as_json = json.loads(ctl(live, "list", "--json").stdout)
    assert [a["name"] for a in as_json] == ["ctl-one", "ctl-two"] and as_json[0]["target_modules"] == ["q_proj",
                                                                                                       "v_proj"]

    shown = ctl(live, "show", "ctl-one")
    assert shown.returncode == 0 and "kind:" in shown.stdout and "lora" in shown.stdout
    assert json.loads(ctl(live, "show", "ctl-one", "--json").stdout)["sha256"] == as_json[0]["sha256"]

    deleted = ctl(live, "delete", "ctl-one")
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted ctl-one"
    refused(ctl(live, "show", "ctl-one"), 1, "404")
    refused(ctl(live, "delete", "ctl-one"), 1, "not found")
    assert [a["name"] for a in json.loads(ctl(live, "list", "--json").stdout)] == ["ctl-two"]


def test_overwrite_needs_the_flag(live, lora):
    assert ctl(live, "upload", str(lora), "--name", "ctl-over").returncode == 0
    refused(ctl(live, "upload", str(lora), "--name", "ctl-over"), 1, "409")
    replaced = ctl(live, "upload", str(lora), "--name", "ctl-over", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr


def test_refusals_are_one_line_with_nonzero_exit(live, lora, tmp_path):
    refused(ctl(live, "list", key=None), 1, "401")
    refused(ctl(live, "list", key="ctl-inference"), 1, "403")
    refused(ctl(live, "upload", str(tmp_path / "missing"), "--name", "x"), 2, "does not exist")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(lora / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"pickle")
    refused(ctl(live, "upload", str(pickled), "--name", "x"), 2, "adapter_model.bin")
    broken = tmp_path / "broken"
    shutil.copytree(lora, broken)
    (broken / "adapter_config.json").write_text("{not json")
    refused(ctl(live, "upload", str(broken), "--name", "x"), 1, "400")
    refused(ctl(live, "upload", str(lora), "--name", "../x"), 1, "invalid adapter name")
    refused(ctl(None, "--server", f"http://127.0.0.1:{free_port()}", "list", key=None), 3, "cannot reach")
    usage = ctl(live, "frobnicate")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def test_environment_variables_and_options_after_the_command(live):
    env = {"ADAPTERCTL_SERVER": live.url, "ADAPTERCTL_API_KEY": ADMIN_KEY}
    result = ctl(None, "list", "--json", key=None, env=env)
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)
    after = subprocess.run(adapterctl_command() + ["list", "--server", live.url, "--api-key", ADMIN_KEY, "--json"],
                           capture_output=True, text=True, timeout=60)
    assert after.returncode == 0 and isinstance(json.loads(after.stdout), list)
