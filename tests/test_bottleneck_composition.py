"""Compositions holding a bottleneck adapter (``adapters: [lora, bottleneck, prefix]``), against a reference
independent of the server: PEFT applies the LoRA (merged) and the prefix (tests.test_composition_golden's
oracle), and forward hooks on the transformers decoder layers add the bottleneck module exactly as the issue's
formulas place it (a = the attention output, h' = h + a, m = the MLP output):

* houlsby: a -> a + f_attn(a), m -> m + f_out(m);
* pfeiffer: m -> m + f(m + h');
* parallel: m -> m + scaling f(h').

(Those formulas are held against the AdapterHub library itself in tests/test_bottleneck_golden.py.)
"""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adapters.store import AdapterStore
from server.model.loader import load_model
from tests.peft_adapters import make_lora, make_prefix
from tests.test_adapters_golden import PROMPT, engine_for, peft_greedy
from tests.test_bottleneck_uploads import VARIANTS, hub_adapter
from tests.test_composition_golden import comp, engine_greedy, engine_logits, peft_oracle

ACT = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu, "tanh": torch.tanh}


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    base = tiny_checkpoints["llama"]
    root = tmp_path_factory.mktemp("bn-compose")
    paths = {"lora": make_lora(base, root / "lora", seed=51), "prefix": make_prefix(base, root / "prefix", seed=52)}
    for i, variant in enumerate(VARIANTS):
        paths[variant] = hub_adapter(root / variant, base, variant, seed=53 + i)
    store = AdapterStore(root / "store")
    for name, path in paths.items():
        store.add(name, path)
    return base, store, paths, load_model(base, dtype=torch.float32)


def add_bottleneck_hooks(model, path, variant: str) -> None:
    """Hooks on the transformers layers of ``model`` computing the variant's formula with the saved weights."""
    bn = VARIANTS[variant]
    weights = load_file(str(path / "adapter.safetensors"))
    act, scaling = ACT[bn["non_linearity"]], bn["scaling"]

    def f(i, place, x):
        key = f"model.layers.{i}.{place}_adapters.adapters.{variant}"
        z = act(x @ weights[f"{key}.adapter_down.0.weight"].t() + weights[f"{key}.adapter_down.0.bias"])
        return z @ weights[f"{key}.adapter_up.weight"].t() + weights[f"{key}.adapter_up.bias"]

    layers = next(m for n, m in model.named_modules() if n.endswith("model.layers"))
    for i, layer in enumerate(layers):
        seen = {}
        layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, args, seen=seen: seen.update(h=args[0]))
        if bn["mh_adapter"]:
            layer.self_attn.register_forward_hook(
                lambda _m, _a, out, i=i: (out[0] + scaling * f(i, "attention", out[0]),) + tuple(out[1:]))
        if variant == "houlsby":
            hook = lambda _m, _a, m, i=i: m + scaling * f(i, "output", m)  # noqa: E731
        elif variant == "pfeiffer":
            hook = lambda _m, _a, m, i=i, seen=seen: m + scaling * f(i, "output", m + seen["h"])  # noqa: E731
        else:
            hook = lambda _m, _a, m, i=i, seen=seen: m + scaling * f(i, "output", seen["h"])  # noqa: E731
        layer.mlp.register_forward_hook(hook)


def reference(base, paths, members: dict[str, float]):
    peft_members = {n: w for n, w in members.items() if n not in VARIANTS}
    model = peft_oracle(base, paths, comp(peft_members))
    for name in members:
        if name in VARIANTS:
            add_bottleneck_hooks(model, paths[name], name)
    return model


CASES = {
    "lora+houlsby+prefix": {"lora": 1.0, "houlsby": 1.0, "prefix": 1.0},
    "lora+pfeiffer": {"lora": 1.0, "pfeiffer": 1.0},
    "parallel+prefix": {"parallel": 1.0, "prefix": 1.0},
}


@pytest.mark.parametrize("case", list(CASES))
def test_composition_with_a_bottleneck_matches_the_reference(setup, case):
    base, store, paths, loaded = setup
    members = CASES[case]
    engine = engine_for(loaded, store, max_lora_rank=64)
    model = reference(base, paths, members)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    ours = engine_logits(engine, comp(members))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    for name in members:  # every member visibly matters
        rest = {n: w for n, w in members.items() if n != name}
        assert (ours - engine_logits(engine, comp(rest))).abs().max() > 0.02, name
    assert engine_greedy(engine, [(None, comp(members), PROMPT)])[0] == peft_greedy(model)


def test_compositions_with_bottlenecks_batch_with_other_rows(setup):
    _, store, _, loaded = setup
    rows = [(None, comp(CASES["lora+houlsby+prefix"]), PROMPT), ("pfeiffer", None, PROMPT[:5]), (None, None, PROMPT),
            (None, comp(CASES["parallel+prefix"]), PROMPT[:7]), ("lora", None, PROMPT[:6])]
    solo = [engine_greedy(engine_for(loaded, store, max_lora_rank=64, max_batch=1), [row])[0] for row in rows]
    mixed = engine_greedy(engine_for(loaded, store, max_lora_rank=64, max_adapter_slots=8), rows)
    assert mixed == solo


def test_two_bottlenecks_in_one_composition_are_refused(setup):
    from server.engine.request import RequestError, SamplingParams

    _, store, _, loaded = setup
    engine = engine_for(loaded, store, max_lora_rank=64)
    with pytest.raises(RequestError, match="both bottleneck"):
        engine.make_request(PROMPT, SamplingParams(max_tokens=1), composition=comp({"houlsby": 1.0, "pfeiffer": 1.0}))
