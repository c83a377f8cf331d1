"""Per-step cost of structured output: grammar masks for N constrained rows, xgrammar vs llguidance.

On the default model's tokenizer (SmolLM2, 49152 tokens), one JSON schema (an object with a
bounded string, an integer and a bounded array), N rows walking the same valid output: per step,
each row's allowed-token bitmask is computed, applied to [N, V] logits and the row advanced by one
token. Also checks what each library lets into a JSON string (raw control characters are invalid
JSON). llguidance is optional (`pip install llguidance`); the server uses xgrammar
(server/engine/structured.py), which this measures through the server's own `Grammars`.

    python -m loadtest.bench_structured [--rows 32]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from server.engine.request import canonical_response_format
from server.engine.structured import Grammars, advance, constrain
from server.model.default_model import ensure_default_model

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
OUTPUT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "code"]}, separators=(",", ":"))
BAD = '{"name":"a\u0001b","age":1,"tags":[]}'


def bench_xgrammar(tokenizer, vocab: int, rows: int) -> dict:
    grammars = Grammars(tokenizer, vocab, frozenset({tokenizer.eos_token_id}))
    spec = canonical_response_format({"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    start = time.perf_counter()
    grammar = grammars.compile(spec)
    compile_ms = (time.perf_counter() - start) * 1e3
    matchers = [grammars.matcher(grammar) for _ in range(rows)]
    ids = tokenizer.encode(OUTPUT, add_special_tokens=False)
    logits = torch.randn(rows, vocab)
    start = time.perf_counter()
    for token in ids:
        constrain(logits, matchers)
        advance(matchers, [token] * rows)
    step_ms = (time.perf_counter() - start) / len(ids) * 1e3
    bad = grammars.matcher(grammar)
    return {"compile_ms": compile_ms, "step_ms": step_ms,
            "raw_control_char_accepted": all(bad.accept_token(t) for t in tokenizer.encode(BAD, add_special_tokens=False))}


def bench_llguidance(tokenizer, vocab: int, rows: int) -> dict | None:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as llt
    except ImportError:
        return None
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                            defaults={"whitespace_flexible": False})
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(rows)]
    compile_ms = (time.perf_counter() - start) * 1e3
    ids = tokenizer.encode(OUTPUT, add_special_tokens=False)
    logits, bitmask = torch.randn(rows, vocab), llt.allocate_token_bitmask(rows, vocab)
    start = time.perf_counter()
    for token in ids:
        for i, matcher in enumerate(matchers):
            llt.fill_next_token_bitmask(matcher, bitmask, i)
        llt.apply_token_bitmask_inplace(logits, bitmask)
        for matcher in matchers:
            matcher.consume_token(token)
    step_ms = (time.perf_counter() - start) / len(ids) * 1e3
    bad = llguidance.LLMatcher(lltok, grammar)
    accepted = all(bad.consume_token(t) for t in tokenizer.encode(BAD, add_special_tokens=False)) and not bad.is_error()
    return {"compile_ms": compile_ms, "step_ms": step_ms, "raw_control_char_accepted": accepted}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoConfig, AutoTokenizer

    path = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = AutoConfig.from_pretrained(path).vocab_size
    print(f"{args.rows} constrained rows, vocab {vocab}, {len(tokenizer.encode(OUTPUT, add_special_tokens=False))} "
          "steps")
    for name, result in (("xgrammar (served)", bench_xgrammar(tokenizer, vocab, args.rows)),
                         ("llguidance", bench_llguidance(tokenizer, vocab, args.rows))):
        if result is None:
            print(f"{name:<18} not installed")
            continue
        print(f"{name:<18} compile {result['compile_ms']:7.1f} ms | mask+advance per step {result['step_ms']:7.2f} ms "
              f"({result['step_ms'] / args.rows * 1e3:6.0f} us/row) | raw control char in a string accepted: "
              f"{result['raw_control_char_accepted']}")


if __name__ == "__main__":
    main()
