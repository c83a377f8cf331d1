"""Adapter management over HTTP (/v1/adapters) and choosing an adapter per request."""
import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.api_support import adapter_files, peft_lora, serve, tar_gz, upload, wait_until, with_config, zip_bytes

BASE = "tiny-llama-builtin"
UPLOAD_LIMIT = 400_000  # the test adapters are ~60 kB


@pytest.fixture(scope="module")
def loras(builtin_model_dir):
    return peft_lora(str(builtin_model_dir), seed=1), peft_lora(str(builtin_model_dir), seed=2)


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("adapters")
    config = with_config(max_upload_bytes=UPLOAD_LIMIT)
    with serve(builtin_model_dir, store_dir, config, max_seq_len=1024) as (server, engine):
        server.engine = engine
        server.store_dir = store_dir
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def parts(directory: Path) -> list[tuple[str, bytes]]:
    return list(adapter_files(directory).items())


def greedy_text(client, model=BASE, adapter=None, max_tokens=8) -> str:
    extra = {"ignore_eos": True, **({"adapter": adapter} if adapter else {})}
    return client.completions.create(model=model, prompt="Hello", max_tokens=max_tokens, temperature=0,
                                     extra_body=extra).choices[0].text


def names(live) -> list[str]:
    return [a["name"] for a in httpx.get(f"{live.url}/v1/adapters").json()["data"]]


def assert_clean(live):
    """No staged leftovers in the store."""
    staging = live.store_dir / ".staging"
    assert not any(staging.iterdir()), list(staging.iterdir())


def test_upload_files_list_get_and_models(live, loras, client):
    response = upload(live.url, "alpha", parts(loras[0]))
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["name"] == "alpha" and info["kind"] == "lora" and info["rank"] == 4
    assert info["target_modules"] == ["q_proj", "v_proj"] and len(info["sha256"]) == 64
    assert httpx.get(f"{live.url}/v1/adapters/alpha").json() == info
    assert "alpha" in names(live)
    cards = {m.id: m for m in client.models.list().data}
    assert cards[BASE].kind == "base" and cards[BASE].parent is None
    assert cards["alpha"].kind == "lora" and cards["alpha"].parent == BASE
    assert_clean(live)


def test_adapter_chosen_by_field_or_model_name(live, loras, client):
    if "alpha" not in names(live):
        assert upload(live.url, "alpha", parts(loras[0])).status_code == 201
    base = greedy_text(client)
    by_model = greedy_text(client, model="alpha")
    by_field = greedy_text(client, adapter="alpha")
    assert by_model == by_field != base
    reply = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
    assert reply.model == "alpha"
    streamed = client.completions.create(model=BASE, prompt="Hello", max_tokens=8, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True, "adapter": "alpha"})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == by_field


def test_mixed_batch_of_base_and_adapter_requests(live, loras, client):
    if "alpha" not in names(live):
        assert upload(live.url, "alpha", parts(loras[0])).status_code == 201
    expected = {None: greedy_text(client), "alpha": greedy_text(client, adapter="alpha")}
    results, errors = [], []

    def call(adapter):
        try:
            results.append((adapter, greedy_text(client, adapter=adapter)))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(a,)) for a in (None, "alpha") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert all(text == expected[adapter] for adapter, text in results)


def test_upload_archives(live, loras):
    files = adapter_files(loras[1])
    nested = tar_gz({f"my-adapter/{k}": v for k, v in files.items()})
    assert upload(live.url, "from-tar", [("my-adapter.tar.gz", nested)]).status_code == 201
    flat = zip_bytes(files)
    response = upload(live.url, "from-zip", [("adapter.zip", flat)])
    assert response.status_code == 201, response.text
    assert httpx.get(f"{live.url}/v1/adapters/from-zip").json()["sha256"] == \
        httpx.get(f"{live.url}/v1/adapters/from-tar").json()["sha256"]
    assert_clean(live)


@pytest.mark.parametrize("archive, fragment", [
    ("dotdot", ".."),
    ("absolute", "absolute"),
    ("symlink", "link"),
    ("zip-dotdot", ".."),
    ("two-adapters", "several adapters"),
    ("no-config", "adapter_config.json"),
    ("garbage", "not a readable"),
])
def test_archive_tricks_are_refused(live, loras, tmp_path, archive, fragment):
    files = adapter_files(loras[0])
    blobs = {
        "dotdot": ("a.tar.gz", tar_gz({**files, "../escaped.txt": b"x"})),
        "absolute": ("a.tar.gz", tar_gz({**files, "/tmp/escaped.txt": b"x"})),
        "symlink": ("a.tar.gz", tar_gz(files, links={"adapter_model.safetensors.link": "/etc/passwd"})),
        "zip-dotdot": ("a.zip", zip_bytes({**files, "../../escaped.txt": b"x"})),
        "two-adapters": ("a.tar.gz", tar_gz({**{f"one/{k}": v for k, v in files.items()},
                                             **{f"two/{k}": v for k, v in files.items()}})),
        "no-config": ("a.tar.gz", tar_gz({"adapter_model.safetensors": files["adapter_model.safetensors"]})),
        "garbage": ("a.tar.gz", b"this is not gzip"),
    }
    before = names(live)
    response = upload(live.url, "tricky", [blobs[archive]])
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]
    assert names(live) == before
    assert not (Path("/tmp") / "escaped.txt").exists()
    assert_clean(live)


def test_invalid_adapters_are_400_naming_the_problem(live, loras):
    files = adapter_files(loras[0])
    config = json.loads(files["adapter_config.json"])
    cases = [
        ("bad name", "../evil", list(files.items()), "invalid adapter name"),
        ("pickle", "pickled", [("adapter_config.json", files["adapter_config.json"]),
                               ("adapter_model.bin", b"\x80\x04pickle")], "pickle"),
        ("no weights", "noweights", [("adapter_config.json", files["adapter_config.json"])],
         "adapter_model.safetensors"),
        ("wrong targets", "mismatch", [("adapter_config.json", json.dumps({**config, "target_modules": ["k_proj"]})
                                        .encode()), ("adapter_model.safetensors", files["adapter_model.safetensors"])],
         "target_modules"),
        ("other base", "otherbase", [("adapter_config.json",
                                      json.dumps({**config, "base_model_name_or_path": "org/some-7b"}).encode()),
                                     ("adapter_model.safetensors", files["adapter_model.safetensors"])],
         "base_model_name_or_path"),
        ("path as file name", "pathname", [("sub/adapter_config.json", files["adapter_config.json"])], "sub/"),
    ]
    before = names(live)
    for label, name, blobs, fragment in cases:
        response = upload(live.url, name, blobs)
        assert response.status_code == 400, (label, response.text)
        message = response.json()["error"]["message"]
        assert fragment in message, (label, message)
        assert "adapter-upload-" not in message and ".staging" not in message, (label, message)
    assert names(live) == before
    assert_clean(live)


def test_too_large_is_413(live):
    response = upload(live.url, "huge", [("adapter_config.json", b"{}"),
                                         ("adapter_model.safetensors", b"\0" * (UPLOAD_LIMIT + 1))])
    assert response.status_code == 413
    assert "limit" in response.json()["error"]["message"]
    bomb = tar_gz({"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * (UPLOAD_LIMIT * 4)})
    assert len(bomb) < UPLOAD_LIMIT
    response = upload(live.url, "bomb", [("bomb.tar.gz", bomb)])
    assert response.status_code == 413 and "unpacked" in response.json()["error"]["message"]
    assert "huge" not in names(live) and "bomb" not in names(live)
    assert_clean(live)


def test_overwrite_needs_the_flag_and_replaces_atomically(live, loras, client):
    assert upload(live.url, "beta", parts(loras[0])).status_code == 201
    first_sha = httpx.get(f"{live.url}/v1/adapters/beta").json()["sha256"]
    first_text = greedy_text(client, adapter="beta")
    conflict = upload(live.url, "beta", parts(loras[1]))
    assert conflict.status_code == 409 and "beta" in conflict.json()["error"]["message"]
    refused = upload(live.url, "beta", [("adapter_config.json", b"{not json")], overwrite=True)
    assert refused.status_code == 400
    assert httpx.get(f"{live.url}/v1/adapters/beta").json()["sha256"] == first_sha
    assert greedy_text(client, adapter="beta") == first_text
    replaced = upload(live.url, "beta", parts(loras[1]), overwrite=True)
    assert replaced.status_code == 201 and replaced.json()["sha256"] != first_sha
    assert greedy_text(client, adapter="beta") != first_text
    assert_clean(live)


def test_delete(live, loras, client):
    assert upload(live.url, "doomed", parts(loras[0])).status_code == 201
    response = httpx.delete(f"{live.url}/v1/adapters/doomed")
    assert response.status_code == 200 and response.json() == {"id": "doomed", "object": "adapter", "deleted": True}
    assert httpx.get(f"{live.url}/v1/adapters/doomed").status_code == 404
    assert httpx.delete(f"{live.url}/v1/adapters/doomed").status_code == 404
    with pytest.raises(openai.NotFoundError):
        greedy_text(client, adapter="doomed")
    assert "doomed" not in [m.id for m in client.models.list().data]


def test_deleting_an_adapter_in_use_lets_running_requests_finish(live, loras):
    assert upload(live.url, "busy", parts(loras[0])).status_code == 201
    body = {"model": "busy", "prompt": "Hello", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert httpx.delete(f"{live.url}/v1/adapters/busy").status_code == 200
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
    assert httpx.post(f"{live.url}/v1/completions", json={"model": "busy", "prompt": "x"}).status_code == 404
    assert wait_until(lambda: live.engine.num_running == 0)


def test_upload_needs_multipart_name_and_files(live, loras):
    assert httpx.post(f"{live.url}/v1/adapters", json={"name": "x"}).status_code == 400
    no_name = httpx.post(f"{live.url}/v1/adapters", files=[("files", ("adapter_config.json", b"{}"))])
    assert no_name.status_code == 400 and "name" in no_name.json()["error"]["message"]
    no_files = httpx.post(f"{live.url}/v1/adapters", data={"name": "x"},
                          files=[("other", ("adapter_config.json", b"{}"))])
    assert no_files.status_code == 400 and "files" in no_files.json()["error"]["message"]
    bad_flag = upload(live.url, "x", parts(loras[0]))
    assert bad_flag.status_code in (201, 409)
    response = httpx.post(f"{live.url}/v1/adapters", data={"name": "x", "overwrite": "maybe"},
                          files=[("files", ("adapter_config.json", b"{}"))])
    assert response.status_code == 400 and "overwrite" in response.json()["error"]["message"]
