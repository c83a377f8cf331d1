"""AdapterHub bottleneck adapters without the library: upload refusals (table), the saved head, `adapterctl
convert`, and batches that mix bottleneck rows with LoRA and base rows (equal to each row alone).

The adapters are written here in the library's save format (adapters.kinds.bottleneck's docstring) with
random weights; their numerics against the library itself are tests/test_bottleneck_golden.py.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.convert import ConvertError, convert_dir
from adapters.format import AdapterError, load_adapter
from adapters.peft_targets import BaseSpec
from adapters.store import AdapterStore
from server.model.loader import load_model
from tests.api_support import adapter_files, peft_lora, serve, upload
from tests.test_adapters_golden import engine_for, generate, greedy_request

VARIANTS = {  # the library's presets (adapters 1.3.0 BnConfig subclasses)
    "houlsby": {"mh_adapter": True, "output_adapter": True, "reduction_factor": 16, "non_linearity": "swish",
                "original_ln_before": False, "is_parallel": False, "scaling": 1.0},
    "pfeiffer": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
                 "original_ln_before": True, "is_parallel": False, "scaling": 1.0},
    "parallel": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 2, "non_linearity": "relu",
                 "original_ln_before": False, "is_parallel": True, "scaling": 4.0},
}
COMMON = {"architecture": "bottleneck", "ln_before": False, "ln_after": False, "residual_before_ln": True,
          "original_ln_after": True, "phm_layer": False, "inv_adapter": None, "use_gating": False, "leave_out": [],
          "init_weights": "bert", "dropout": 0.0, "cross_adapter": False}


def base_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def hub_adapter(out: Path, model_dir: Path, variant: str = "houlsby", seed: int = 0, biases: bool = True,
                **overrides) -> Path:
    """Write an AdapterHub bottleneck adapter dir (adapter_config.json + adapter.safetensors) for the base."""
    cfg = base_config(model_dir)
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    bn = {**COMMON, **VARIANTS[variant], **overrides}
    places = [p for p, flag in (("attention", "mh_adapter"), ("output", "output_adapter")) if bn[flag]]
    width = int(hidden // bn["reduction_factor"])
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for place in places:
            key = f"model.layers.{i}.{place}_adapters.adapters.{variant}"
            tensors[f"{key}.adapter_down.0.weight"] = torch.randn(width, hidden, generator=g) * 0.2
            tensors[f"{key}.adapter_up.weight"] = torch.randn(hidden, width, generator=g) * 0.2
            if biases:
                tensors[f"{key}.adapter_down.0.bias"] = torch.randn(width, generator=g) * 0.1
                tensors[f"{key}.adapter_up.bias"] = torch.randn(hidden, generator=g) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "config": bn, "hidden_size": hidden, "model_class": "LlamaForCausalLM", "model_type": cfg["model_type"],
        "name": variant, "version": "adapters.1.3.0"}))
    save_file(tensors, str(out / "adapter.safetensors"))
    return out


def lm_head(model_dir: Path) -> torch.Tensor:
    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    return weights.get("lm_head.weight", weights["model.embed_tokens.weight"])


def _edit_config(path: Path, **bn) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config["config"].update(bn)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, change) -> None:
    tensors = load_file(str(path / "adapter.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "adapter.safetensors"))


def _pickle(path: Path) -> None:
    torch.save(load_file(str(path / "adapter.safetensors")), path / "pytorch_adapter.bin")
    (path / "adapter.safetensors").unlink()


def _zero_up(tensors: dict) -> None:
    for k in tensors:
        if "adapter_up" in k:
            tensors[k].zero_()


def _narrow(tensors: dict) -> None:  # a width the config does not give
    key = next(k for k in tensors if k.endswith("adapter_down.0.weight"))
    tensors[key] = tensors[key][:-1].contiguous()


# (case, how the good adapter is broken, words the refusal must hold)
REFUSALS = [
    ("ln_before", lambda p: _edit_config(p, ln_before=True), ["ln_before"]),
    ("ln_after", lambda p: _edit_config(p, ln_after=True), ["ln_after"]),
    ("phm_layer", lambda p: _edit_config(p, phm_layer=True), ["phm_layer", "PHM"]),
    ("invertible", lambda p: _edit_config(p, inv_adapter="nice"), ["inv_adapter", "invertible"]),
    ("gating", lambda p: _edit_config(p, use_gating=True), ["use_gating"]),
    ("unknown option", lambda p: _edit_config(p, fancy_option=3), ["fancy_option"]),
    ("activation", lambda p: _edit_config(p, non_linearity="mish"), ["non_linearity", "relu"]),
    ("no place", lambda p: _edit_config(p, mh_adapter=False, output_adapter=False), ["mh_adapter"]),
    ("learned scaling", lambda p: _edit_config(p, scaling="learned"), ["scaling"]),
    ("width vs config", lambda p: _edit_tensors(p, _narrow), ["shape", "reduction_factor"]),
    ("untrained", lambda p: _edit_tensors(p, _zero_up), ["all zeros"]),
    ("pickle", _pickle, ["pytorch_adapter.bin", "adapterctl convert DIR"]),
    ("leave_out all", lambda p: _edit_config(p, leave_out=list(range(64))), ["leave_out"]),
]


@pytest.fixture(scope="module")
def spec(builtin_model_dir):
    from transformers import AutoConfig

    return BaseSpec.from_hf_config(AutoConfig.from_pretrained(builtin_model_dir), "builtin")


@pytest.mark.parametrize("case,breaks,words", REFUSALS, ids=[c for c, _, _ in REFUSALS])
def test_refusals_name_the_option(builtin_model_dir, spec, tmp_path, case, breaks, words):
    path = hub_adapter(tmp_path / "a", builtin_model_dir)
    load_adapter(path, spec, max_rank=64)  # the unbroken adapter loads
    breaks(path)
    with pytest.raises(AdapterError) as exc:
        load_adapter(path, spec, max_rank=64)
    assert all(w in str(exc.value) for w in words), str(exc.value)


def test_width_bounded_by_max_lora_rank(builtin_model_dir, spec, tmp_path):
    path = hub_adapter(tmp_path / "a", builtin_model_dir, "parallel")  # reduction 2: width hidden / 2
    width = spec.hidden_size // 2
    assert load_adapter(path, spec, max_rank=width).rank == width
    with pytest.raises(AdapterError, match="--max-lora-rank"):
        load_adapter(path, spec, max_rank=width - 1)


def test_other_base_refused(builtin_model_dir, spec, tmp_path):
    path = hub_adapter(tmp_path / "a", builtin_model_dir)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "hidden_size": spec.hidden_size * 2}))
    with pytest.raises(AdapterError, match="hidden_size"):
        load_adapter(path, spec, max_rank=64)
    (path / "adapter_config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(AdapterError, match="model_type"):
        load_adapter(path, spec, max_rank=64)


def test_convert_writes_shared_tensors_once_per_name(builtin_model_dir, tmp_path):
    path = hub_adapter(tmp_path / "a", builtin_model_dir, "pfeiffer")
    want = load_file(str(path / "adapter.safetensors"))
    state = dict(want)
    shared = torch.randn(3, 4)
    state["prefix.a"], state["prefix.b"] = shared, shared  # one storage under two names (MAM's prefix)
    torch.save(state, path / "pytorch_adapter.bin")
    torch.save({"lm_head.weight": lm_head(builtin_model_dir)}, path / "pytorch_model_head.bin")
    (path / "adapter.safetensors").unlink()
    written = convert_dir(path, remove_pickle=True)
    got = load_file(str(written))
    assert set(got) == set(state)
    for k, t in state.items():
        assert torch.equal(got[k], t), k
    assert torch.equal(load_file(str(path / "model_head.safetensors"))["lm_head.weight"], lm_head(builtin_model_dir))
    assert not (path / "pytorch_adapter.bin").exists() and not (path / "pytorch_model_head.bin").exists()
    with pytest.raises(ConvertError, match="has no pytorch_adapter.bin"):
        convert_dir(path)


class _Evil:
    def __reduce__(self):
        return (print, ("pickle ran code",))


def test_convert_never_runs_pickled_code(tmp_path):
    torch.save({"x": torch.zeros(1), "evil": _Evil()}, tmp_path / "pytorch_adapter.bin")
    with pytest.raises(ConvertError, match="weights_only=True"):
        convert_dir(tmp_path)
    assert not (tmp_path / "adapter.safetensors").exists()


def test_adapterctl_convert_command(builtin_model_dir, tmp_path, capsys):
    from adapters.cli import main

    path = hub_adapter(tmp_path / "a", builtin_model_dir)
    _pickle(path)
    assert main(["convert", str(path)]) == 0
    assert (path / "adapter.safetensors").is_file() and "wrote" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "missing")]) == 2


# ---- over HTTP: upload, refusals with their status, the saved head, mixed batches


@pytest.fixture(scope="module")
def live(builtin_model_dir, tmp_path_factory):
    with serve(builtin_model_dir, tmp_path_factory.mktemp("store"), max_seq_len=256, max_lora_rank=64) as (server, engine):
        yield server


def hub_parts(path: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(path.iterdir()) if p.is_file()]


def test_upload_and_refusals_over_http(live, builtin_model_dir, tmp_path):
    good = hub_adapter(tmp_path / "good", builtin_model_dir, "houlsby")
    response = upload(live.url, "bn-houlsby", hub_parts(good))
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == "bottleneck"
    for case, breaks, words in REFUSALS:
        path = hub_adapter(tmp_path / case, builtin_model_dir)
        breaks(path)
        response = upload(live.url, "bn-bad", hub_parts(path))
        assert response.status_code == 400, (case, response.text)
        message = response.json()["error"]["message"]
        assert all(w in message for w in words), (case, message)


def test_saved_head_equal_to_the_base_is_accepted_else_refused(live, builtin_model_dir, tmp_path):
    head = lm_head(builtin_model_dir)
    same = hub_adapter(tmp_path / "same", builtin_model_dir, "pfeiffer")
    save_file({"lm_head.weight": head.float().contiguous()}, str(same / "model_head.safetensors"))
    (same / "head_config.json").write_text(json.dumps({"config": None}))
    response = upload(live.url, "bn-head", hub_parts(same))
    assert response.status_code == 201, response.text
    other = hub_adapter(tmp_path / "other", builtin_model_dir, "pfeiffer")
    changed = head.float().clone()
    changed[0, 0] += 1.0
    save_file({"lm_head.weight": changed}, str(other / "model_head.safetensors"))
    response = upload(live.url, "bn-head2", hub_parts(other))
    assert response.status_code == 400 and "differs from the base's lm_head" in response.text, response.text
    torch.save({"lm_head.weight": head}, other / "pytorch_model_head.bin")
    (other / "model_head.safetensors").unlink()
    response = upload(live.url, "bn-head3", hub_parts(other))
    assert response.status_code == 400 and "adapterctl convert DIR" in response.text, response.text


def test_mixed_batch_of_bottleneck_lora_and_base_rows_equals_solo(builtin_model_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.add("lora", peft_lora(str(builtin_model_dir), seed=3))
    store.add("houlsby", hub_adapter(tmp_path / "h", builtin_model_dir, "houlsby", seed=1))
    store.add("pfeiffer", hub_adapter(tmp_path / "p", builtin_model_dir, "pfeiffer", seed=2, biases=False))
    store.add("parallel", hub_adapter(tmp_path / "q", builtin_model_dir, "parallel", seed=3, non_linearity="gelu",
                                      reduction_factor=3.2))
    loaded = load_model(builtin_model_dir, dtype=torch.float32)
    names = [None, "houlsby", "lora", "pfeiffer", None, "parallel", "lora", "houlsby"]
    prompts = [[5, 72, 101, 108, 108, 111, 32, 119][: 4 + i % 5] for i in range(len(names))]
    solo = [generate(engine_for(loaded, store, max_batch=1), [greedy_request(n, p, 6)])[0]
            for n, p in zip(names, prompts)]
    mixed = generate(engine_for(loaded, store), [greedy_request(n, p, 6) for n, p in zip(names, prompts)])
    assert mixed == solo
    base = generate(engine_for(loaded, store, max_batch=1), [greedy_request(None, prompts[1], 6)])[0]
    assert solo[1] != base, "the bottleneck adapter must change the output"


def test_max_adapter_width_is_an_alias_of_max_lora_rank():
    from server.cli import parse_args

    assert parse_args(["--max-adapter-width", "48"])[0].max_lora_rank == 48
    assert parse_args(["--max-lora-rank", "24"])[0].max_lora_rank == 24


def test_adapterctl_upload_sends_the_saved_head_and_refuses_pickles(builtin_model_dir, tmp_path):
    from adapters.cli import CLIError, upload_parts

    path = hub_adapter(tmp_path / "a", builtin_model_dir)
    save_file({"lm_head.weight": lm_head(builtin_model_dir).float().contiguous()}, str(path / "model_head.safetensors"))
    (path / "head_config.json").write_text("{}")
    sent = [name for _, (name, _) in upload_parts(path)]
    assert sent == ["adapter_config.json", "adapter.safetensors", "head_config.json", "model_head.safetensors"]
    torch.save({"lm_head.weight": torch.zeros(1)}, path / "pytorch_model_head.bin")
    (path / "model_head.safetensors").unlink()
    with pytest.raises(CLIError, match="pytorch_model_head.bin.*adapterctl convert"):
        upload_parts(path)


def test_saved_head_against_the_lm_head_table(builtin_model_dir, tmp_path):
    from adapters.kinds.bottleneck import check_saved_head

    head = lm_head(builtin_model_dir).float()
    assert check_saved_head(tmp_path, head) is False  # no head saved
    cases = [  # (saved tensors, base lm_head, refusal or None)
        ({"lm_head.weight": head}, head, None),
        ({"heads.default.0.weight": head}, head.to(torch.bfloat16), None),  # equal after the base's rounding
        ({"lm_head.weight": head + 1e-3}, head, "differs from the base's lm_head"),
        ({"lm_head.weight": head[:-1]}, head, "has shape"),
        ({"lm_head.weight": head, "lm_head.bias": head[:, 0]}, head, "lm_head.bias"),
        ({"lm_head.weight": head}, None, "quantized or packed"),
    ]
    for saved, base, refusal in cases:
        save_file({k: v.contiguous() for k, v in saved.items()}, str(tmp_path / "model_head.safetensors"))
        if refusal is None:
            assert check_saved_head(tmp_path, base) is True
        else:
            with pytest.raises(AdapterError, match=refusal):
                check_saved_head(tmp_path, base)


def test_bench_bottleneck_writes_servable_adapters(builtin_model_dir, spec, tmp_path):
    """loadtest.bench_bottleneck's adapters are what they say (variant, width hidden // 16)."""
    from loadtest.bench_bottleneck import REDUCTION, VARIANTS, write_bottleneck

    for i, variant in enumerate(VARIANTS):
        adapter = load_adapter(write_bottleneck(tmp_path / variant, Path(builtin_model_dir), variant, i), spec,
                               max_rank=64)
        assert adapter.variant == variant and adapter.rank == spec.hidden_size // REDUCTION
