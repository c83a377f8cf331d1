"""vLLM's runtime adapter loading by server-side path (/v1/load_lora_adapter) and `model: base:adapter`."""
import json
import os
import shutil

import httpx
import pytest

from tests.api_support import adapter_files, peft_lora, serve, upload, with_config

BASE = "tiny-llama-builtin"
ADMIN, USER = "admin-key", "user-key"


@pytest.fixture(scope="module")
def lora(builtin_model_dir):
    return peft_lora(str(builtin_model_dir), seed=3)


@pytest.fixture(scope="module")
def layout(tmp_path_factory, lora):
    """A load root holding good and tricky adapter dirs, and a dir outside it."""
    top = tmp_path_factory.mktemp("paths")
    root, outside = top / "root", top / "outside"
    root.mkdir()
    shutil.copytree(lora, root / "good")
    shutil.copytree(lora, outside / "secret")
    (root / "nested").mkdir()
    shutil.copytree(lora, root / "nested" / "deep")
    os.symlink(outside / "secret", root / "linked-dir")                 # a link out of the root
    os.symlink(root / "good", root / "linked-inside")                    # even a link inside is not followed
    (root / "linked-file").mkdir()
    shutil.copy(lora / "adapter_config.json", root / "linked-file" / "adapter_config.json")
    os.symlink(outside / "secret" / "adapter_model.safetensors", root / "linked-file" / "adapter_model.safetensors")
    (root / "pickled").mkdir()
    shutil.copy(lora / "adapter_config.json", root / "pickled" / "adapter_config.json")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (root / "misfit").mkdir()
    config = json.loads((lora / "adapter_config.json").read_text())
    (root / "misfit" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["k_proj"]}))
    shutil.copy(lora / "adapter_model.safetensors", root / "misfit" / "adapter_model.safetensors")
    return root, outside


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory, layout):
    config = with_config(adapter_load_root=str(layout[0]), admin_keys=(ADMIN,), api_keys=(USER,))
    with serve(builtin_model_dir, tmp_path_factory.mktemp("store"), config) as (server, engine):
        yield server


def load(live, body, key=ADMIN):
    return httpx.post(f"{live.url}/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)


def complete(live, **body):
    return httpx.post(f"{live.url}/v1/completions", headers={"Authorization": f"Bearer {USER}"}, timeout=60,
                      json={"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True, **body})


def test_load_by_path_serves_like_an_upload_and_unloads(live, lora, layout):
    assert load(live, {"lora_name": "by-path", "lora_path": "good"}).text == \
        "Success: LoRA adapter 'by-path' added successfully."
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert upload(live.url, "uploaded", list(adapter_files(lora).items()), headers=admin).status_code == 201
    by_path = complete(live, model="by-path").json()["choices"][0]["text"]
    assert by_path == complete(live, model="uploaded").json()["choices"][0]["text"]
    assert by_path == complete(live, model=f"{BASE}:by-path").json()["choices"][0]["text"]
    assert by_path != complete(live, model=BASE).json()["choices"][0]["text"]
    assert load(live, {"lora_name": "by-path", "lora_path": "good"}).status_code == 409       # name taken
    assert load(live, {"lora_name": "by-path", "lora_path": "nested/deep", "load_inplace": True}).status_code == 200
    root_abs = load(live, {"lora_name": "absolute", "lora_path": str(layout[0] / "good")})
    assert root_abs.status_code == 200, root_abs.text
    unload = httpx.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "by-path"}, headers=admin)
    assert unload.status_code == 200 and "removed" in unload.text
    assert complete(live, model="by-path").status_code == 404
    assert httpx.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "by-path"},
                      headers=admin).status_code == 404


@pytest.mark.parametrize("path, fragment", [
    ("../outside/secret", "outside the adapter load root"),
    ("nested/../../outside/secret", "outside the adapter load root"),
    ("/etc", "outside the adapter load root"),
    ("linked-dir", "symbolic link"),
    ("linked-inside", "symbolic link"),
    ("linked-file", "symbolic link"),
    ("pickled", "pickle"),
    ("misfit", "target_modules"),
    ("missing", "not a directory"),
    ("good\x00", "NUL"),
])
def test_every_escape_and_bad_adapter_is_refused(live, path, fragment):
    response = load(live, {"lora_name": "tricky", "lora_path": path})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]
    assert complete(live, model="tricky").status_code == 404


def test_scopes_and_bad_bodies(live):
    assert load(live, {"lora_name": "x", "lora_path": "good"}, key=USER).status_code == 403
    assert load(live, {"lora_name": "x", "lora_path": "good"}, key="nope").status_code == 401
    assert load(live, {"lora_name": "../x", "lora_path": "good"}).status_code == 400
    assert load(live, {"lora_name": "x"}).status_code == 400
    assert complete(live, model="other-base:by-path").status_code == 404
    assert complete(live, model=f"{BASE}:").status_code == 400


def test_loading_by_path_is_off_by_default(builtin_model_dir, tmp_path, lora):
    with serve(builtin_model_dir, tmp_path / "store") as (server, _):
        response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(lora)})
    assert response.status_code == 403 and "--adapter-load-root" in response.json()["error"]["message"]
