"""The AdapterHub library's logits for saved adapters: run by the `adapters` venv's python, never imported.

Like scripts/adapterhub_oracle.py it must run outside the repository root (our package is also named
``adapters``); tests/adapterhub_oracle.py (``library_logits``) runs it that way.

    python adapterhub_logits.py SPEC.json OUT.json

SPEC: {"base": DIR (a Hugging Face checkpoint), "quantization": "none" | "nf4", "prompts": [[ids...], ...],
       "adapters": [DIR, ...] (AdapterHub dirs: adapter_config.json + adapter.safetensors), "new_tokens": n (0),
       "gate": null | "token" (UniPELT's gates per token: adapterhub_oracle.per_token_gates, copied beside this file)}
OUT: {"base": [[V logits of the last prompt token] per prompt], DIR: [...] per adapter}, fp32, by full
recomputation (``use_cache=False``) with eager attention; with new_tokens, also {"tokens": {"base" | DIR: [[n greedy
tokens] per prompt]}}, each step recomputed in full. "nf4" loads the base through bitsandbytes (4-bit NF4
weights, fp32 compute, on the CPU), as `transformers` + `adapters` users run QLoRA-style bases.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    import adapters
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    spec = json.loads(Path(sys.argv[1]).read_text())
    kwargs = dict(attn_implementation="eager", dtype=torch.float32)
    if spec.get("quantization", "none") == "nf4":
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    model = AutoModelForCausalLM.from_pretrained(spec["base"], **kwargs)
    adapters.init(model)
    model.eval()

    @torch.no_grad()
    def logits() -> list[list[float]]:
        return [model(input_ids=torch.tensor([p]), use_cache=False).logits[0, -1].float().tolist()
                for p in spec["prompts"]]

    @torch.no_grad()
    def greedy(prompt: list[int], n: int) -> list[int]:
        ids, tokens = list(prompt), []
        for _ in range(n):
            tokens.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
            ids.append(tokens[-1])
        return tokens

    if spec.get("gate") == "token":
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # python -I leaves the script's dir off sys.path
        from adapterhub_oracle import per_token_gates
        per_token_gates().__enter__()  # for the whole run: this process only computes these references
    n = int(spec.get("new_tokens", 0))
    out, tokens = {"base": logits()}, {}
    if n:
        tokens["base"] = [greedy(p, n) for p in spec["prompts"]]
    for path in spec["adapters"]:
        name = model.load_adapter(path, use_safetensors=True)
        model.set_active_adapters(name)
        model.eval()
        out[path] = logits()
        if n:
            tokens[path] = [greedy(p, n) for p in spec["prompts"]]
        model.set_active_adapters(None)
        model.delete_adapter(name)
    if n:
        out["tokens"] = tokens
    Path(sys.argv[2]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
