"""PEFT LoRA directory -> llama.cpp LoRA GGUF, with the `gguf` package (for llama-server as a benchmark peer).

llama.cpp's LoRA file (what its convert_lora_to_gguf.py writes, DESIGN.md "llama.cpp"): a GGUF with
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, the base's ``general.architecture``,
and per target linear two tensors ``blk.{i}.{attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down}.weight.lora_a``
= PEFT's A [r, in] and ``...lora_b`` = PEFT's B [out, r]. llama.cpp scales B A by alpha / r, PEFT's own scaling
(rsLoRA's alpha / sqrt(r) and per-module rank/alpha patterns have no field there: refused).

llama.cpp stores q_proj / k_proj rows in its rope order (convert_hf_to_gguf `permute`, per head the even rows
then the odd ones), so B's rows of q and k get the same permutation (A is on the input side and is not
permuted). Tensors are written in fp32.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute: HF q/k row order -> llama.cpp's (rows = n_head * head_dim)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(adapter_dir: str | Path, out: str | Path, num_heads: int, num_kv_heads: int,
            architecture: str = "llama") -> Path:
    """Write `out` (a llama.cpp LoRA GGUF) from a PEFT LoRA directory; returns `out`."""
    import gguf
    from safetensors.numpy import load_file

    adapter_dir, out = Path(adapter_dir), Path(out)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{adapter_dir}: llama.cpp serves plain LoRA only, not {config.get('peft_type')}")
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: rsLoRA and rank/alpha patterns have no llama.cpp equivalent")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    written = 0
    for key in sorted(tensors):
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{adapter_dir}: tensor {key} is not a LoRA factor of a decoder linear")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if module not in MODULES:
            raise ValueError(f"{adapter_dir}: LoRA on {module} is not served by llama.cpp")
        w = tensors[key].astype(np.float32)
        if which == "B" and module in ("q_proj", "k_proj"):
            w = permute_rows(w, num_heads if module == "q_proj" else num_kv_heads)
        writer.add_tensor(f"blk.{layer}.{MODULES[module]}.weight.lora_{which.lower()}", np.ascontiguousarray(w))
        written += 1
    if not written:
        raise ValueError(f"{adapter_dir}: no LoRA tensors")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("adapter_dir")
    p.add_argument("out")
    p.add_argument("--num-heads", type=int, required=True)
    p.add_argument("--num-kv-heads", type=int, required=True)
    p.add_argument("--architecture", default="llama")
    a = p.parse_args(argv)
    print(convert(a.adapter_dir, a.out, a.num_heads, a.num_kv_heads, a.architecture))


if __name__ == "__main__":
    main()
