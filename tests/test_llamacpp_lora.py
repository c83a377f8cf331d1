"""loadtest.llamacpp_lora: a PEFT LoRA written as llama.cpp's LoRA GGUF (keys, names, shapes, q/k row order of B,
alpha), read back with the gguf package's reader. That llama-server then computes what we do is checked by
`python -m loadtest.llamacpp_check` (it needs `make install-llamacpp`)."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from loadtest.llamacpp_lora import convert, permute_rows
from server.model.gguf_grid import unpermute_rows
from tests.peft_adapters import make_lora


def test_peft_lora_to_llama_cpp_gguf(tiny_checkpoints, tmp_path):
    import torch
    from gguf import GGUFReader

    base = tiny_checkpoints["llama"]
    config = json.loads((base / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    lora = make_lora(base, tmp_path / "lora", seed=3, targets=("q_proj", "k_proj", "v_proj", "down_proj"))
    out = convert(lora, tmp_path / "lora.gguf", heads, kv_heads)
    reader = GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == json.loads((lora / "adapter_config.json").read_text())["lora_alpha"]
    peft = load_file(str(lora / "adapter_model.safetensors"))
    got = {t.name: np.array(t.data).reshape(tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
    assert len(got) == len(peft) == 2 * 4 * config["num_hidden_layers"]
    for i in range(config["num_hidden_layers"]):
        for module, name, parent, n_head in (("q_proj", "attn_q", "self_attn", heads),
                                             ("k_proj", "attn_k", "self_attn", kv_heads),
                                             ("v_proj", "attn_v", "self_attn", None),
                                             ("down_proj", "ffn_down", "mlp", None)):
            prefix = f"base_model.model.model.layers.{i}.{parent}.{module}"
            a, b = peft[f"{prefix}.lora_A.weight"], peft[f"{prefix}.lora_B.weight"]
            assert np.array_equal(got[f"blk.{i}.{name}.weight.lora_a"], a)
            want_b = b if n_head is None else permute_rows(b, n_head)
            assert np.array_equal(got[f"blk.{i}.{name}.weight.lora_b"], want_b)
            if n_head is not None:  # the row order the base's GGUF q/k weights have, undone by gguf_grid
                assert not np.array_equal(want_b, b)
                assert np.array_equal(unpermute_rows(torch.from_numpy(want_b), n_head).numpy(), b)


def test_rslora_is_refused(tiny_checkpoints, tmp_path):
    lora = make_lora(tiny_checkpoints["llama"], tmp_path / "rs", seed=4, use_rslora=True)
    with pytest.raises(ValueError, match="rsLoRA"):
        convert(lora, tmp_path / "rs.gguf", 4, 2)
