"""What the offered load is made of: adapter popularity, kind mix, prompts, arrival times.

Shared by the locustfile and the harness, so both draw requests the same way:

* Adapters are ranked by popularity; rank ``i`` is requested with probability
  proportional to ``1 / (i + 1) ** skew`` (Zipf-like; skew 0 = uniform).
* The kinds of the ranked adapters follow a mix (``lora=0.5,ia3=0.25,prefix=0.25``), spread
  by smooth weighted round robin, so popular and rare ranks both hold every kind.
* A fraction of requests names no adapter (the base model).
* Everything is drawn from one seeded RNG: the same seed gives every system under test
  the same sequence of requests (adapter, prompt) and, for Poisson load, the same arrival times.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from itertools import accumulate

KINDS = ("lora", "ia3", "prefix")  # the kinds the load mixes (loadtest.harness, locust)
GENERATED_KINDS = KINDS + ("dora", "prompt", "lorabias")  # loadtest.adapters_gen makes these too (new: appended)

_WORD_TEXT = ("the a of to and in is it you that he was for on are with as his they be at one have this from or "
         "had by word but what some we can out other were all there when up use your how said an each she "
         "which do their time if will way about many then them write would like so these her long make thing "
         "see him two has look more day could go come did number sound no most people my over know water than "
         "call first who may down side been now find any new work part take get place made live where after "
         "back little only round man year came show every good me give our under name very through just form "
         "sentence great think say help low line differ turn cause much mean before move right boy old too "
         "same tell does set three want air well also play small end put home read hand port large spell add "
         "even land here must big high such follow act why ask men change went light kind off need house "
         "picture try us again animal point mother world near build self earth father")
WORDS = tuple(_WORD_TEXT.split())


def adapter_name(kind: str, index: int) -> str:
    """Generated adapters are called ``<kind>-<index:04d>`` (see :mod:`loadtest.adapters_gen`)."""
    return f"{kind}-{index:04d}"


def parse_mix(text: str) -> dict[str, float]:
    """``"lora=0.5,ia3=0.25,prefix=0.25"`` -> weights (kinds left out weigh 0)."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, weight = part.partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in KINDS:
            raise ValueError(f"bad mix entry {part!r}: use KIND=WEIGHT with KIND in {', '.join(KINDS)}")
        mix[kind] = float(weight)
        if mix[kind] < 0:
            raise ValueError(f"mix weight for {kind} is negative")
    if not any(mix.values()):
        raise ValueError(f"mix {text!r} gives every kind weight 0")
    return mix


def format_mix(mix: dict[str, float]) -> str:
    return ",".join(f"{k}={mix[k]:g}" for k in KINDS if mix.get(k))


def assign_kinds(n: int, mix: dict[str, float], available: dict[str, int] | None = None) -> list[str]:
    """Kinds of popularity ranks 0..n-1 in proportion to ``mix`` (smooth weighted round robin).

    ``available`` caps how many adapters of each kind exist; a kind that runs out drops out.
    """
    left = {k: n if available is None else available.get(k, 0) for k in KINDS if mix.get(k, 0) > 0}
    credit = dict.fromkeys(left, 0.0)
    kinds = []
    for _ in range(n):
        live = [k for k in left if left[k] > 0]
        if not live:
            break
        total = sum(mix[k] for k in live)
        for k in live:
            credit[k] += mix[k]
        pick = max(live, key=lambda k: (credit[k], -KINDS.index(k)))
        credit[pick] -= total
        left[pick] -= 1
        kinds.append(pick)
    return kinds


def ranked_adapters(n: int, mix: dict[str, float]) -> list[str]:
    """Names (``<kind>-<index>``) of the ``n`` generated adapters in popularity order."""
    counters = dict.fromkeys(KINDS, 0)
    names = []
    for kind in assign_kinds(n, mix):
        names.append(adapter_name(kind, counters[kind]))
        counters[kind] += 1
    return names


def ranked_from_available(available: dict[str, list[str]], n: int | None, mix: dict[str, float]) -> list[str]:
    """Popularity order over adapters a server already holds (by kind, in name order), at most ``n``."""
    total = sum(len(v) for k, v in available.items() if mix.get(k, 0) > 0)
    n = total if n is None else min(n, total)
    queues = {k: sorted(v) for k, v in available.items()}
    return [queues[k].pop(0) for k in assign_kinds(n, mix, {k: len(v) for k, v in queues.items()})]


class Zipf:
    """Ranks 0..n-1 with P(i) proportional to 1 / (i + 1) ** skew."""

    def __init__(self, n: int, skew: float):
        if n < 1:
            raise ValueError("Zipf needs at least one rank")
        weights = [1.0 / (i + 1) ** skew for i in range(n)]
        self.cumulative = list(accumulate(weights))
        self.total = self.cumulative[-1]
        self.probabilities = [w / self.total for w in weights]

    def sample(self, rng: random.Random) -> int:
        return min(bisect.bisect_left(self.cumulative, rng.random() * self.total), len(self.cumulative) - 1)


@dataclass(frozen=True)
class RequestSpec:
    """One request of the load: which adapter (None: the base) and which prompt."""

    adapter: str | None
    prompt: str | list[int]
    max_tokens: int
    adapters: dict[str, float] | None = None  # a composition instead (the server's `adapters` field)

    @property
    def kind(self) -> str:
        if self.adapters is not None:
            return "composition"
        return "base" if self.adapter is None else self.adapter.rpartition("-")[0] or "adapter"


class Workload:
    """An endless, reproducible sequence of :class:`RequestSpec`.

    ``prompt_ids``: a pool of token ids to draw ``prompt_tokens``-long token-id prompts from
    (exact prompt lengths, the harness); without it prompts are ``prompt_tokens`` random
    words (the locustfile, whatever the server's model is).
    """

    def __init__(self, adapters: list[str], *, skew: float = 1.0, base_fraction: float = 0.0, seed: int = 0,
                 prompt_tokens: int = 32, max_tokens: int = 32, prompt_ids: list[int] | None = None):
        if not 0.0 <= base_fraction <= 1.0:
            raise ValueError("base_fraction must be within [0, 1]")
        self.adapters = list(adapters)
        self.base_fraction = base_fraction if self.adapters else 1.0
        self.zipf = Zipf(len(self.adapters), skew) if self.adapters else None
        self.rng = random.Random(seed)
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.prompt_ids = list(prompt_ids) if prompt_ids else None

    def next(self) -> RequestSpec:
        rng = self.rng
        base = rng.random() < self.base_fraction
        adapter = None if base or self.zipf is None else self.adapters[self.zipf.sample(rng)]
        if self.prompt_ids:
            prompt: str | list[int] = [rng.choice(self.prompt_ids) for _ in range(self.prompt_tokens)]
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(self.prompt_tokens))
        return RequestSpec(adapter, prompt, self.max_tokens)

    def take(self, n: int) -> list[RequestSpec]:
        return [self.next() for _ in range(n)]


def poisson_arrivals(rate: float, count: int, seed: int = 0) -> list[float]:
    """``count`` arrival offsets in seconds from 0 of a Poisson process at ``rate`` requests/s."""
    rng = random.Random(seed ^ 0x5EED)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def prompt_id_pool(model_dir) -> list[int]:
    """Ordinary (non-special) token ids of the model's tokenizer, from encoding plain English words."""
    from pathlib import Path

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    text = " ".join(WORDS) + " " + " ".join(w.capitalize() for w in WORDS) + " 0123456789 , . ; : ! ?"
    ids = sorted(set(tok.encode(text, add_special_tokens=False).ids))
    specials = set(tok.get_added_tokens_decoder())
    return [i for i in ids if i not in specials]
