"""The benchmark base model: the ~134M Llama of :mod:`loadtest.bench_engine`, with a full tokenizer.

``bench_engine.make_model_dir`` writes the model (hidden 768, 12 layers, vocab 32000, random
weights) with the built-in byte-level tokenizer, which only knows ids 0..262: every other id
the random model samples decodes to nothing. A streamed response would then carry almost no
text, and time to first token / inter-token latency (measured from the text chunks every
server sends) would mean nothing. So here the same weights get a tokenizer that covers the
whole vocabulary: a byte-level BPE whose ids 0..255 are the bytes, 256..31992 fixed merges
of printable ASCII (every one decodes to 2 or 3 characters) and 31993..31999 the built-in
special tokens. HF ``AutoTokenizer``, our server and vLLM all read it from ``tokenizer.json``.

Prompts in the harness are token ids, so every system sees exactly the same prompt length.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from itertools import product
from pathlib import Path

log = logging.getLogger(__name__)

BENCH_MODEL_NAME = "bench-llama-134m"
RECIPE_VERSION = 1
VOCAB_SIZE = 32000
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?-'\"()"
TEXT_IDS = (256, VOCAB_SIZE - 7)  # [low, high): ids that decode to printable text


def build_tokenizer():
    """A byte-level BPE with exactly ``VOCAB_SIZE`` ids, specials last (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from server.model import builtin

    chars = builtin._byte_to_unicode()
    vocab = {ch: i for i, ch in enumerate(chars)}
    letters = [chars[ord(c)] for c in ALPHABET]
    merges: list[tuple[str, str]] = []
    budget = VOCAB_SIZE - len(vocab) - len(builtin.SPECIAL_TOKENS)
    pairs = [a + b for a, b in product(letters, letters)]
    for a, b in product(letters, letters):
        merges.append((a, b))
    for pair, c in product(pairs, letters):
        if len(merges) >= budget:
            break
        merges.append((pair, c))
    merges = merges[:budget]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in builtin.SPECIAL_TOKENS])
    bos_id = tok.token_to_id(builtin.BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{builtin.BOS} $A", pair=f"{builtin.BOS} $A {builtin.BOS} $B:1",
        special_tokens=[(builtin.BOS, bos_id)])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    return tok


def _complete(path: Path) -> bool:
    try:
        marker = json.loads((path / "bench_model.json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("recipe_version") == RECIPE_VERSION


def _write(dest: Path) -> None:
    from loadtest.bench_engine import make_model_dir
    from server.model import builtin

    make_model_dir(dest)
    tok = build_tokenizer()
    tok.save(str(dest / "tokenizer.json"))
    configs = builtin._configs(tok)
    ids = {t: tok.token_to_id(t) for t in builtin.SPECIAL_TOKENS}
    config = json.loads((dest / "config.json").read_text())
    config.update(bos_token_id=ids[builtin.BOS], eos_token_id=ids[builtin.EOS], pad_token_id=ids[builtin.PAD])
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    generation = configs["generation_config.json"]
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (dest / "tokenizer_config.json").write_text(json.dumps(configs["tokenizer_config.json"], indent=2))
    (dest / "special_tokens_map.json").write_text(json.dumps(configs["special_tokens_map.json"], indent=2))
    (dest / "bench_model.json").write_text(json.dumps({"name": BENCH_MODEL_NAME,
                                                       "recipe_version": RECIPE_VERSION}))


def ensure_bench_model(cache_dir: Path | None = None) -> Path:
    """``<cache>/models/bench-llama-134m`` (``$ADAPTER_SERVER_CACHE`` or ~/.cache/adapter-server), made once."""
    from server.model.builtin import default_cache_dir

    target = Path(cache_dir or default_cache_dir()) / "models" / BENCH_MODEL_NAME
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("writing the benchmark model to %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BENCH_MODEL_NAME}.", dir=target.parent))
    try:
        _write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
