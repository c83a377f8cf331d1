"""response_format in the engine: constrained rows always parse (and validate), batched beside free rows."""
import json

import jsonschema
import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import Request, RequestError, SamplingParams
from server.engine.structured import canonical_response_format
from server.model.loader import load_model

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(builtin_model_dir):
    return Engine(load_model(builtin_model_dir, dtype=torch.float32), EngineConfig(max_batch=6, max_seq_len=512))


def fmt(value):
    return canonical_response_format(value)


def params(response_format=None, **kw):
    return SamplingParams(**{"max_tokens": 200, "temperature": 0.0, "response_format": response_format, **kw})


def test_constrained_rows_parse_and_free_rows_are_unchanged(engine):
    schema = fmt({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    prompt = engine.encode("Describe someone:")
    free_alone = engine.make_request(prompt, params(max_tokens=12, ignore_eos=True))
    engine.generate([free_alone])
    # json_object leaves strings unbounded: a bias towards '"' and '}' ends this random model's strings
    close = ((ord('"'), 100.0), (ord("}"), 100.0))
    requests = [engine.make_request(prompt, params(fmt({"type": "json_object"}), logit_bias=close)),
                engine.make_request(prompt, params(max_tokens=12, ignore_eos=True)),
                engine.make_request(prompt, params(schema)),
                *[engine.make_request(prompt, params(schema, temperature=1.0, seed=s)) for s in range(3)]]
    outputs = engine.generate(requests)
    texts = ["".join(o.text for o in outputs[r.request_id]) for r in requests]
    assert isinstance(json.loads(texts[0]), dict)
    for text in texts[2:]:
        jsonschema.validate(json.loads(text), SCHEMA)  # json.loads is strict: no raw control characters
        assert list(json.loads(text)) == ["name", "age", "tags"]  # in the schema's order, as OpenAI emits them
    assert len(set(texts[3:])) > 1                                      # sampled rows really differ
    assert requests[1].output_token_ids == free_alone.output_token_ids  # the free row never saw a mask
    assert all(outputs[r.request_id][-1].finish_reason == "stop" for r in requests[2:])


@pytest.mark.parametrize("value, fragment", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}, "frobnicate"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/definitions/nope"}}}, "definitions"),
    ({"type": "json_schema", "json_schema": "nope"}, "json_schema object"),
    ({"type": "yaml"}, "yaml"),
])
def test_unsupported_formats_are_request_errors(engine, value, fragment):
    with pytest.raises(RequestError, match=fragment):
        engine.make_request([1, 2, 3], params(fmt(value)))


def test_strings_never_hold_raw_control_characters(engine):
    """Strict JSON forbids raw U+0000-U+001F inside strings, bounded or not (xgrammar's bounded strings allowed them)."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}, "b": {"type": "string"}},
              "required": ["a", "b"]}
    grammar = engine.grammars.compile(fmt({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}))
    for text, accepted in (('{"a":"ok","b":"fine"}', True), ('{"a":"o\tk","b":""}', False),
                           ('{"a":"ok","b":"x\x01"}', False)):
        matcher = engine.grammars.matcher(grammar)
        ids = [b for b in text.encode()]  # the built-in tokenizer: byte b is token b
        assert all(matcher.accept_token(t) for t in ids) is accepted, text


def test_response_format_over_http_chat_and_completions(builtin_model_dir, tmp_path):
    import httpx

    from tests.api_support import serve

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    with serve(builtin_model_dir, tmp_path / "store") as (server, _):
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "n": 3, "temperature": 1.0,
            "seed": 5, "response_format": response_format}).json()
        for choice in chat["choices"]:
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        completion = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "prompt": "x", "max_tokens": 60, "temperature": 0, "response_format": response_format}).json()
        jsonschema.validate(json.loads(completion["choices"][0]["text"]), schema)
        bad = httpx.post(f"{server.url}/v1/completions", json={
            "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}})
        assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
        missing = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x",
                                                                   "response_format": {"type": "json_schema"}})
        assert missing.status_code == 400 and "json_schema" in missing.json()["error"]["message"]
