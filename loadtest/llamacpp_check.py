"""Does llama-server compute what we compute? Greedy tokens of the default model, base and one LoRA, ours vs
llama-server (built by `make install-llamacpp`), on the same GGUF file.

    python -m loadtest.llamacpp_check [--tokens 32] [--port 8089]

The LoRA is a random PEFT LoRA (r=8 on q, k, v, o; non-zero B) converted by loadtest.llamacpp_lora; a wrong q/k
row permutation of B, or a wrong scale, shows as a LoRA run that diverges from ours at once while the base run
agrees. Ours runs the file on its own grid (`--quantization gguf`) in fp32 and in bf16. llama.cpp multiplies Q4_1
weights by activations it quantizes to 8 bits (Q8_1), so long greedy runs may part where two logits are close:
the first divergence is printed, with the top-2 logit gap of ours there.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import torch

from adapters.store import AdapterStore
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model.default_model import default_gguf_path, ensure_default_model
from server.model.loader import load_model

from loadtest.llamacpp_lora import convert
from loadtest.servers import llamacpp_bin

PROMPT = "The history of the Roman Empire"


def make_lora(base: Path, out: Path, seed: int = 7) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(out)
    return out


def start_llama_server(gguf: Path, lora: Path, port: int, threads: int) -> subprocess.Popen:
    cmd = [str(llamacpp_bin("llama-server")), "-m", str(gguf), "--lora-scaled", f"{lora}:0", "-t", str(threads),
           "-tb", str(threads), "-c", "1024", "-np", "1", "--port", str(port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("llama-server did not become healthy in 120 s")


def llama_greedy(port: int, ids: list[int], n: int, lora_scale: float) -> list[int]:
    body = {"prompt": ids, "n_predict": n, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
            "return_tokens": True, "ignore_eos": True, "lora": [{"id": 0, "scale": lora_scale}]}
    r = httpx.post(f"http://127.0.0.1:{port}/completion", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["tokens"]


def ours_greedy(engine: Engine, ids: list[int], n: int, adapter: str | None) -> list[int]:
    request = engine.make_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                  adapter=adapter)
    engine.generate([request])
    return list(request.output_token_ids)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    base, gguf_file = ensure_default_model(), default_gguf_path()
    work = Path(tempfile.mkdtemp(prefix="llamacpp-check-"))
    lora_dir = make_lora(base, work / "lora")
    config = json.loads((base / "config.json").read_text())
    lora_gguf = convert(lora_dir, work / "lora.gguf", config["num_attention_heads"], config["num_key_value_heads"])
    store = AdapterStore(work / "store")
    store.add("lora", lora_dir)
    results = {}
    server = start_llama_server(gguf_file, lora_gguf, a.port, a.threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            loaded = load_model(base, dtype=dtype, quantization="gguf")
            ids = loaded.tokenizer(PROMPT)["input_ids"]
            engine = Engine(loaded, EngineConfig(max_batch=1, max_seq_len=256, max_adapter_slots=1), store=store)
            for adapter, scale in ((None, 0.0), ("lora", 1.0)):
                ours = ours_greedy(engine, ids, a.tokens, adapter)
                theirs = llama_greedy(a.port, ids, a.tokens, scale)
                at = first_divergence(ours, theirs)
                key = f"{str(dtype).removeprefix('torch.')}/{adapter or 'base'}"
                results[key] = {"first_divergence": at, "ours": ours, "llama.cpp": theirs}
                print(f"{key}: {'identical' if at is None else f'first divergence at token {at}'} "
                      f"({a.tokens} tokens)", flush=True)
        base_run, lora_run = results["float32/base"]["llama.cpp"], results["float32/lora"]["llama.cpp"]
        print(f"llama.cpp: the LoRA changes the output from token {first_divergence(base_run, lora_run)}")
    finally:
        server.kill()
        server.wait()
    return results


if __name__ == "__main__":
    main()
