"""Prompt logprobs on /v1/completions: ``echo`` with ``logprobs`` returns the prompt's tokens with their
logprobs (the first null) before the generated ones, in OpenAI's legacy shape, for string and token-id
prompts, several prompts per request, max_tokens 0, streaming, the base and each adapter kind; the values
equal log_softmax of the HF / PEFT forward logits."""
import json

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.api.completions import TokenTexts
from tests.api_support import adapter_files, serve, upload
from tests.peft_adapters import make_ia3, make_lora, make_prefix

BASE = "tiny-llama-builtin"
PROMPT = "Hello world, here I am"
ATOL = 1e-4


@pytest.fixture(scope="module")
def adapters(builtin_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return {"lora": make_lora(builtin_model_dir, root / "lora", seed=1, r=4),
            "ia3": make_ia3(builtin_model_dir, root / "ia3", seed=2),
            "prefix": make_prefix(builtin_model_dir, root / "prefix", seed=3)}


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory, adapters):
    with serve(builtin_model_dir, tmp_path_factory.mktemp("store")) as (server, engine):
        for name, path in adapters.items():
            assert upload(server.url, name, list(adapter_files(path).items())).status_code == 201
        yield server, engine


def complete(live, **body) -> dict:
    response = httpx.post(f"{live[0].url}/v1/completions", timeout=60,
                          json={"model": BASE, "temperature": 0, "ignore_eos": True, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream(live, **body) -> list[dict]:
    body = {"model": BASE, "temperature": 0, "ignore_eos": True, "stream": True, **body}
    with httpx.stream("POST", f"{live[0].url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [e[len("data: "):] for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def reference(model_dir, ids: list[int], peft_dir=None) -> torch.Tensor:
    """log_softmax of the HF (or PEFT) forward logits [T, V]: row i predicts token i + 1."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if peft_dir is not None:
        model = PeftModel.from_pretrained(model, peft_dir)
    with torch.no_grad():
        return torch.log_softmax(model.eval()(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def check_shape(choice: dict, n_prompt: int, n_generated: int, k: int) -> None:
    """One entry per prompt and generated token, the first prompt token's null, the top dicts (the token
    itself and the k most likely; tokens with the same text share a key), offsets pointing into the
    returned text at each token's text."""
    logprobs, text = choice["logprobs"], choice["text"]
    n = n_prompt + n_generated
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == \
        len(logprobs["text_offset"]) == n
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs["token_logprobs"][1:])
    for token, lp, top in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert top[token] >= lp and 1 <= len(top) <= k + 1 and max(top.values()) >= lp
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)
    assert "".join(logprobs["tokens"]) == text
    for token, offset in zip(logprobs["tokens"], offsets):
        assert text[offset:offset + len(token)] == token


def test_echo_logprobs_shape_and_values_equal_the_hf_forward(live, builtin_model_dir):
    engine = live[1]
    ids = engine.encode(PROMPT)
    body = complete(live, prompt=PROMPT, echo=True, logprobs=2, max_tokens=3)
    choice = body["choices"][0]
    check_shape(choice, len(ids), 3, 2)
    plain = complete(live, prompt=PROMPT, logprobs=2, max_tokens=3)["choices"][0]
    assert choice["text"] == engine.decode(ids) + plain["text"]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 3, "total_tokens": len(ids) + 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    generated = {key: value[len(ids):] for key, value in choice["logprobs"].items()}
    shift = len(engine.decode(ids))
    shifted = dict(plain["logprobs"], text_offset=[o + shift for o in plain["logprobs"]["text_offset"]])
    assert generated["tokens"] == shifted["tokens"] and generated["text_offset"] == shifted["text_offset"]
    assert generated["token_logprobs"] == pytest.approx(shifted["token_logprobs"], abs=ATOL)
    expected = reference(builtin_model_dir, ids)
    lps = choice["logprobs"]["token_logprobs"][1:len(ids)]
    torch.testing.assert_close(torch.tensor(lps), expected[torch.arange(len(ids) - 1), ids[1:]], atol=ATOL, rtol=0)
    top_values = expected[:len(ids) - 1].topk(2).values
    for position, top in enumerate(choice["logprobs"]["top_logprobs"][1:len(ids)]):
        assert sorted(top.values(), reverse=True)[0] == pytest.approx(float(top_values[position, 0]), abs=ATOL)
    # lm-eval's is_greedy test: a token that is the most likely has its own logprob as the top value
    greedy = [lp == max(top.values()) for lp, top in zip(lps, choice["logprobs"]["top_logprobs"][1:len(ids)])]
    assert greedy == [int(expected[i].argmax()) == ids[i + 1] for i in range(len(ids) - 1)]


def test_token_id_prompts_and_several_prompts_per_request(live):
    engine = live[1]
    texts = [PROMPT, "Bye now", "Another, longer prompt than the others"]
    ids = [engine.encode(t) for t in texts]
    by_text = complete(live, prompt=texts, echo=True, logprobs=1, max_tokens=2)
    by_ids = complete(live, prompt=ids, echo=True, logprobs=1, max_tokens=2)
    solo = [complete(live, prompt=p, echo=True, logprobs=1, max_tokens=2)["choices"][0] for p in ids]
    assert [c["index"] for c in by_ids["choices"]] == [0, 1, 2]
    for a, b, c, prompt_ids in zip(by_text["choices"], by_ids["choices"], solo, ids):
        check_shape(b, len(prompt_ids), 2, 1)
        assert a["text"] == b["text"] == c["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert b["logprobs"]["token_logprobs"][1:] == pytest.approx(c["logprobs"]["token_logprobs"][1:], abs=ATOL)
        assert b["logprobs"]["token_logprobs"][1:] == pytest.approx(a["logprobs"]["token_logprobs"][1:], abs=ATOL)
    without_bos = complete(live, prompt=ids[0][1:], echo=True, logprobs=0, max_tokens=1)["choices"][0]
    check_shape(without_bos, len(ids[0]) - 1, 1, 0)  # the first token is a real one: still null
    two = complete(live, prompt=PROMPT, echo=True, logprobs=1, max_tokens=2, n=2)["choices"]
    assert two[0]["logprobs"] == two[1]["logprobs"]


def test_max_tokens_zero_scores_the_prompt_only(live):
    engine = live[1]
    ids = engine.encode(PROMPT)
    body = complete(live, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    choice = body["choices"][0]
    check_shape(choice, len(ids), 0, 3)
    assert choice["text"] == engine.decode(ids) and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    longer = complete(live, prompt=PROMPT, echo=True, logprobs=3, max_tokens=4)["choices"][0]["logprobs"]
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(longer["token_logprobs"][1:len(ids)], abs=ATOL)
    plain = complete(live, prompt=PROMPT, max_tokens=0)["choices"][0]
    assert plain["text"] == "" and plain["finish_reason"] == "length" and plain["logprobs"] is None
    echoed = complete(live, prompt=PROMPT, max_tokens=0, echo=True)["choices"][0]
    assert echoed["text"] == engine.decode(ids) and echoed["logprobs"] is None


def test_streamed_echo_logprobs_equal_the_response(live):
    expected = complete(live, prompt=PROMPT, echo=True, logprobs=2, max_tokens=4)["choices"][0]
    chunks = stream(live, prompt=PROMPT, echo=True, logprobs=2, max_tokens=4)
    choices = [c["choices"][0] for c in chunks]
    prompt_ids = live[1].encode(PROMPT)
    assert choices[0]["text"] == live[1].decode(prompt_ids)  # the echo chunk carries the prompt's logprobs
    assert len(choices[0]["logprobs"]["tokens"]) == len(prompt_ids)
    assert "".join(c["text"] for c in choices) == expected["text"]
    assert choices[-1]["finish_reason"] == "length"
    joined = {key: [v for c in choices if c["logprobs"] for v in c["logprobs"][key]] for key in expected["logprobs"]}
    assert joined["tokens"] == expected["logprobs"]["tokens"]
    assert joined["text_offset"] == expected["logprobs"]["text_offset"]
    assert joined["token_logprobs"][1:] == pytest.approx(expected["logprobs"]["token_logprobs"][1:], abs=ATOL)
    only = [c["choices"][0] for c in stream(live, prompt=PROMPT, echo=True, logprobs=0, max_tokens=0)]
    assert len(only) == 1 and only[0]["finish_reason"] == "length" and only[0]["text"] == expected["text"][
        :len(only[0]["text"])]
    check_shape(only[0], len(prompt_ids), 0, 0)


@pytest.mark.parametrize("kind", ["lora", "ia3", "prefix"])
def test_adapter_prompt_logprobs_equal_the_peft_forward(live, builtin_model_dir, adapters, kind):
    engine = live[1]
    ids = engine.encode(PROMPT)
    by_model = complete(live, model=kind, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1)["choices"][0]
    by_field = complete(live, adapter=kind, prompt=ids, echo=True, logprobs=1, max_tokens=1)["choices"][0]
    check_shape(by_model, len(ids), 1, 1)
    ours = torch.tensor(by_model["logprobs"]["token_logprobs"][1:len(ids)])
    assert by_field["logprobs"]["token_logprobs"][1:] == pytest.approx(by_model["logprobs"]["token_logprobs"][1:],
                                                                        abs=ATOL)
    expected = reference(builtin_model_dir, ids, adapters[kind])[torch.arange(len(ids) - 1), ids[1:]]
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    base = reference(builtin_model_dir, ids)[torch.arange(len(ids) - 1), ids[1:]]
    assert (ours - base).abs().max() > 0.01, "the adapter must visibly change the prompt's logprobs"


def test_token_texts_keep_sentencepiece_spaces_and_split_characters():
    """A sentencepiece-style tokenizer (Metaspace, byte fallback, the first space stripped): each token's
    text is what it adds in context, so the texts concatenate to the decoded text."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, ",": 3, "\u2581caf": 4, "<0xC3>": 5, "<0xA9>": 6}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    ids = [1, 2, 3, 4, 5, 6, 2, 1, 2, 2, 3]
    texts = TokenTexts(tokenizer.decode)
    out = [texts.add(i, [2]) for i in ids]
    assert [t for t, _ in out] == ["Hello", " world", ",", " caf", "", "\u00e9", " world", " Hello", " world",
                                   " world", ","]
    assert "".join(t for t, _ in out) == tokenizer.decode(ids)
    assert [alt for _, (alt,) in out] == ["world"] + [" world"] * (len(ids) - 1)
