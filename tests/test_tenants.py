"""Tenants: who can see, use, overwrite and delete which adapter, on every endpoint that names one.

Keys: the operator (admin, no tenant), acme's admin and inference keys, globex's admin key, and an
inference key without a tenant. Adapters: the operator's shared `shared`, acme's and globex's own
`bot` (the same name in two namespaces), and acme's `acme-only`. A cross-tenant attempt must answer
exactly as a name that exists nowhere (`ghost`): same status, same message shape, no other name.
"""
import shutil

import httpx
import pytest

from server.api.auth import ADMIN, INFERENCE, Caller, Tenant, parse_key_file
from server.api.tenancy import AdapterView
from tests.api_support import adapter_files, peft_lora, serve, upload, with_config

BASE = "tiny-llama-builtin"
OPERATOR, ACME_ADMIN, ACME, GLOBEX_ADMIN, PLAIN = "k-op", "k-acme-admin", "k-acme", "k-globex-admin", "k-plain"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"admin {OPERATOR}\nadmin {ACME_ADMIN} tenant=acme weight=2 max_waiting=16\n"
                    f"inference {ACME} tenant=acme\nadmin {GLOBEX_ADMIN} tenant=globex\ninference {PLAIN}\n")
    return path


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory, key_file):
    root = tmp_path_factory.mktemp("load-root")
    for seed, name in ((11, "one"), (12, "two")):
        shutil.copytree(peft_lora(str(builtin_model_dir), seed=seed), root / name)
    config = with_config(api_key_file=str(key_file), adapter_load_root=str(root))
    with serve(builtin_model_dir, tmp_path_factory.mktemp("store"), config) as (server, engine):
        files = lambda seed: list(adapter_files(peft_lora(str(builtin_model_dir), seed=seed)).items())  # noqa: E731
        for key, name, seed in ((OPERATOR, "shared", 1), (ACME_ADMIN, "bot", 2), (GLOBEX_ADMIN, "bot", 3),
                                (ACME_ADMIN, "acme-only", 4)):
            response = upload(server.url, name, files(seed), headers=auth(key))
            assert response.status_code == 201, response.text
            assert response.json()["name"] == name  # the caller's name, never '<tenant>~<name>'
        server.files = files
        yield server


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def complete(live, key: str, **body) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/completions", headers=auth(key), timeout=60,
                      json={"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True, **body})


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def listed(live, key: str, path: str = "/v1/models") -> set[str]:
    response = httpx.get(f"{live.url}{path}", headers=auth(key))
    assert response.status_code == 200, response.text
    return {m["id"] for m in response.json()["data"]}


def test_key_file_terms(key_file, tmp_path):
    keys = parse_key_file(key_file)
    assert keys.caller(OPERATOR) == Caller(ADMIN, None) and keys.caller(OPERATOR).operator
    assert keys.caller(ACME_ADMIN) == Caller(ADMIN, "acme") and not keys.caller(ACME_ADMIN).operator
    assert keys.caller(ACME) == Caller(INFERENCE, "acme") and keys.caller(PLAIN) == Caller(INFERENCE, None)
    assert keys.tenants == {"acme": Tenant("acme", 2.0, 16), "globex": Tenant("globex", 1.0, None)}
    for bad, why in (("admin k tenant=a~b", "not a valid name"), ("admin k tenant=a colour=red", "expected"),
                     ("admin k weight=2", "belong to a tenant"), ("admin k tenant=a weight=0", "weight must"),
                     ("admin k tenant=a max_waiting=x", "integer"), ("admin k tenant=a tenant=b", "expected"),
                     ("admin k tenant=a weight=2\ninference j tenant=a weight=3", "other terms")):
        path = tmp_path / "bad.txt"
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=why):
            parse_key_file(path)


@pytest.mark.parametrize("key, models, adapters", [
    (OPERATOR, {BASE, "shared", "acme~bot", "acme~acme-only", "globex~bot"}, None),
    (ACME_ADMIN, {BASE, "shared", "bot", "acme-only"}, {"shared", "bot", "acme-only"}),
    (ACME, {BASE, "shared", "bot", "acme-only"}, "403"),
    (GLOBEX_ADMIN, {BASE, "shared", "bot"}, {"shared", "bot"}),
    (PLAIN, {BASE, "shared"}, "403"),
])
def test_who_lists_what(live, key, models, adapters):
    assert listed(live, key) == models
    response = httpx.get(f"{live.url}/v1/adapters", headers=auth(key))
    if adapters == "403":
        assert response.status_code == 403
    else:
        assert {a["id"] for a in response.json()["data"]} == (adapters or models - {BASE})


def test_each_tenant_uses_its_own_adapter_of_a_shared_name(live):
    acme, globex = text(complete(live, ACME, model="bot")), text(complete(live, GLOBEX_ADMIN, model="bot"))
    assert acme == text(complete(live, OPERATOR, model="acme~bot"))
    assert globex == text(complete(live, OPERATOR, model="globex~bot")) != acme
    assert text(complete(live, ACME, model=f"{BASE}:bot")) == acme  # base:adapter addressing
    reply = httpx.post(f"{live.url}/v1/chat/completions", headers=auth(ACME), timeout=60,
                       json={"model": "bot", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["model"] == "bot"
    assert complete(live, ACME, model="bot").json()["model"] == "bot"
    assert text(complete(live, ACME, model="shared")) == text(complete(live, PLAIN, model="shared"))
    composed = complete(live, ACME, adapters=["bot", "shared"])
    assert composed.status_code == 200, composed.text


def assert_like_a_missing_name(live, make, name):
    """``make(name)`` answers exactly as ``make('ghost')`` does, with only the asked name swapped."""
    got, missing = make(name), make("ghost")
    assert got.status_code == missing.status_code, (got.text, missing.text)
    assert got.text.replace(name, "ghost") == missing.text
    for leak in ("acme", "globex", "~"):
        assert leak not in got.text.replace(name, "")


@pytest.mark.parametrize("key, name", [
    (GLOBEX_ADMIN, "acme-only"),  # another tenant's adapter
    (PLAIN, "bot"),               # a tenant's adapter, to a key without a tenant
    (ACME, "globex~bot"),         # spelling another tenant's stored name
    (GLOBEX_ADMIN, "acme~acme-only"),
])
def test_another_tenants_adapter_answers_as_a_missing_one(live, key, name):
    url = live.url
    requests = {
        "completion, model": lambda n: complete(live, key, model=n),
        "completion, adapter field": lambda n: complete(live, key, adapter=n),
        "completion, base:adapter": lambda n: complete(live, key, model=f"{BASE}:{n}"),
        "composition": lambda n: complete(live, key, adapters=["shared", n]),
        "chat": lambda n: httpx.post(f"{url}/v1/chat/completions", headers=auth(key), timeout=60,
                                     json={"model": n, "messages": [{"role": "user", "content": "Hi"}]}),
        "model card": lambda n: httpx.get(f"{url}/v1/models/{n}", headers=auth(key)),
        "tokenize": lambda n: httpx.post(f"{url}/tokenize", headers=auth(key), json={"model": n, "prompt": "x"}),
    }
    if key != PLAIN and key != ACME:  # admin scope
        requests |= {
            "adapter info": lambda n: httpx.get(f"{url}/v1/adapters/{n}", headers=auth(key)),
            "delete": lambda n: httpx.delete(f"{url}/v1/adapters/{n}", headers=auth(key)),
            "unload": lambda n: httpx.post(f"{url}/v1/unload_lora_adapter", headers=auth(key), json={"lora_name": n}),
        }
    for what, make in requests.items():
        assert_like_a_missing_name(live, make, name), what
    assert "acme~acme-only" in listed(live, OPERATOR)  # nothing was deleted


def test_uploads_overwrites_and_deletes_stay_in_the_tenants_namespace(live):
    files = live.files
    # globex uploads its own 'acme-only': a new adapter of globex's, acme's is untouched
    assert upload(live.url, "acme-only", files(5), headers=auth(GLOBEX_ADMIN)).status_code == 201
    acme_before = text(complete(live, ACME, model="acme-only"))
    assert text(complete(live, GLOBEX_ADMIN, model="acme-only")) != acme_before
    # an overwrite needs overwrite=true, within the tenant's own namespace, and names the caller's name
    taken = upload(live.url, "acme-only", files(6), headers=auth(GLOBEX_ADMIN))
    assert taken.status_code == 409 and "'acme-only'" in taken.text and "~" not in taken.text
    assert upload(live.url, "acme-only", files(6), overwrite=True, headers=auth(GLOBEX_ADMIN)).status_code == 201
    assert text(complete(live, ACME, model="acme-only")) == acme_before
    # a tenant may not delete the operator's shared adapter; the operator may delete a tenant's
    refused = httpx.delete(f"{live.url}/v1/adapters/shared", headers=auth(GLOBEX_ADMIN))
    assert refused.status_code == 403 and "shared" in listed(live, PLAIN)
    assert httpx.delete(f"{live.url}/v1/adapters/acme-only", headers=auth(GLOBEX_ADMIN)).status_code == 200
    assert "acme-only" in listed(live, ACME) and "acme-only" not in listed(live, GLOBEX_ADMIN)
    # a tenant's upload named like the operator's shared one hides it from that tenant only
    assert upload(live.url, "shared", files(7), headers=auth(GLOBEX_ADMIN)).status_code == 201
    assert text(complete(live, GLOBEX_ADMIN, model="shared")) != text(complete(live, ACME, model="shared"))
    assert httpx.delete(f"{live.url}/v1/adapters/globex~shared", headers=auth(OPERATOR)).status_code == 200
    assert text(complete(live, GLOBEX_ADMIN, model="shared")) == text(complete(live, ACME, model="shared"))


def test_load_by_path_goes_into_the_tenants_namespace(live):
    load = lambda key, name, path: httpx.post(f"{live.url}/v1/load_lora_adapter", headers=auth(key),  # noqa: E731
                                              json={"lora_name": name, "lora_path": path})
    assert load(ACME_ADMIN, "from-path", "one").status_code == 200
    assert load(GLOBEX_ADMIN, "from-path", "two").status_code == 200
    assert "acme~from-path" in listed(live, OPERATOR) and "globex~from-path" in listed(live, OPERATOR)
    assert text(complete(live, ACME, model="from-path")) != text(complete(live, GLOBEX_ADMIN, model="from-path"))
    again = load(ACME_ADMIN, "from-path", "two")
    assert again.status_code == 409 and "~" not in again.text
    unload = httpx.post(f"{live.url}/v1/unload_lora_adapter", headers=auth(ACME_ADMIN), json={"lora_name": "from-path"})
    assert unload.status_code == 200 and "from-path" not in listed(live, ACME)
    assert "from-path" in listed(live, GLOBEX_ADMIN)


@pytest.mark.parametrize("key, status", [(None, 401), (ACME_ADMIN, 403), (ACME, 403), (PLAIN, 403), (OPERATOR, 200)])
def test_metrics_are_the_operators_once_tenants_exist(live, key, status):
    response = httpx.get(f"{live.url}/metrics", headers=auth(key) if key else {})
    assert response.status_code == status
    if status == 200:
        assert "adapter_server_" in response.text


def test_view_table():
    class Store:
        names = ["shared", "bot", "acme~bot", "acme~mine", "globex~bot"]

        def list(self):
            return [type("R", (), {"name": n})() for n in sorted(self.names)]

        def get(self, name):
            from adapters.store import AdapterNotFound
            if name not in self.names:
                raise AdapterNotFound(name)
            return name

    cases = [  # caller, asked name -> stored name (None: not found)
        (Caller(ADMIN, None), "acme~bot", "acme~bot"), (Caller(ADMIN, None), "bot", "bot"),
        (Caller(INFERENCE, "acme"), "bot", "acme~bot"), (Caller(ADMIN, "acme"), "mine", "acme~mine"),
        (Caller(INFERENCE, "acme"), "shared", "shared"), (Caller(INFERENCE, "globex"), "mine", None),
        (Caller(INFERENCE, "globex"), "acme~mine", None), (Caller(INFERENCE, None), "acme~bot", None),
        (Caller(INFERENCE, None), "bot", "bot"), (Caller(INFERENCE, "acme"), "../bot", None),
    ]
    for caller, name, stored in cases:
        view = AdapterView(Store(), caller)
        if stored is None:
            with pytest.raises(KeyError):
                view.stored(name)
        else:
            assert view.stored(name) == stored, (caller, name)
    assert [n for n, _ in AdapterView(Store(), Caller(INFERENCE, "acme")).records()] == ["bot", "mine", "shared"]
    assert [n for n, _ in AdapterView(Store(), Caller(INFERENCE, None)).records()] == ["bot", "shared"]
