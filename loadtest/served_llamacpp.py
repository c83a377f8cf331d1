"""`make bench-served ARGS=--with-llamacpp`: adapter-server against llama.cpp's llama-server, both through HTTP,
at the same weight precision, in the same alternating rounds (issue 23, points 5 and 6).

The model is the default one (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF). Precision groups, each one
llama-server and the adapter-servers it is compared with (ours: default flags, `--max-batch 32
--max-adapter-slots 32`, `--quantization` as below, `--dtype auto`, which is bf16 for all of these where the CPU
has native bf16):

| group | llama-server file | ours |
|---|---|---|
| F16 | the shipped file requantized to F16 (`llama-quantize --allow-requantize`) | `--quantization none` (bf16) |
| Q8_0 | the shipped file requantized to Q8_0 | `--quantization int8-wo` |
| Q4_1 | the shipped file as is | `--quantization auto` (the file's own grid here); `int4-wo` too with
  `--llamacpp-int4-wo` |

Both sides hold the same weights: our checkpoint is the dequantized Q4_1 file, and F16/Q8_0 are made from it.
llama-server runs `-t 2 -tb 2 -np 32 -c 32768 -cb -kvu --slot-save-path DIR` with the benchmark's `--clients`
LoRAs (r=16 on q, k, v, o; PEFT's files converted by loadtest.llamacpp_lora), all at scale 0; a request turns its own on with
`"lora": [{"id": i, "scale": 1}]` (servers.llamacpp_peer). Workloads (LOADS), each timed once per round on every
server of the group, the server order alternating between rounds, the workload order rotating:

- 1 stream, `--stream-tokens` (128) tokens; `--clients` (32) streams of `--new-tokens` (64) on the base;
  the same on `--clients` distinct LoRAs: generated tokens / wall time of the batch.
- TTFT of one `--ttft-prompts` (2,000 and 7,000) token prompt asking for 1 token: prompt tokens / the request's
  time (send to end of stream), in the first `--ttft-rounds` (1) rounds only: one 7,000-token prompt takes
  llama-server about a minute here, and a prompt that long averages the noise out. Each round gets a fresh prompt
  (the same for every server in the round), so no prefix cache helps; llama-server's slots are erased after it
  (a kept 7,000-token slot would sit in the unified KV pool).

Printed per group: tok/s of each side (medians over rounds), the median of within-round ratios ours / llama-server,
and the point-6 targets (TARGETS) met or not. The load average is recorded before and after each group: the
machine is shared, compare within one run.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from loadtest import served
from loadtest.adapters_gen import AdapterFactory, register
from loadtest.servers import erase_slots, llamacpp_bin, llamacpp_peer
from loadtest.stats import batch_summary
from loadtest.workload import RequestSpec


@dataclass(frozen=True)
class Group:
    llama: str                 # llama-server's file type (llama-quantize's name); "Q4_1": the shipped file as is
    ours: tuple[str, ...]      # our servers' --quantization values


GROUPS = {"F16": Group("F16", ("none",)), "Q8_0": Group("Q8_0", ("int8-wo",)), "Q4_1": Group("Q4_1", ("auto",))}
SHIPPED = "Q4_1"  # the default model's file type
OURS = {"none": "bf16", "int8-wo": "int8-wo", "auto": "auto (gguf grid)", "int4-wo": "int4-wo"}  # --quantization: label


@dataclass(frozen=True)
class Load:
    key: str
    label: str
    streams: int
    new_tokens: int
    prompt_tokens: int
    lora: bool = False
    ttft: bool = False         # value: prompt tokens / seconds of a 1-token request, not generated tok/s


# point 6: ours / llama-server (median of within-round ratios), at least
TARGETS = {"single": 1.0, "base": 1.2, "lora": 3.0, "ttft": 1.0}
OWN_LORA_VS_BASE = 0.9  # and ours on 32 LoRAs at least this x ours on the base, in the same round


LOAD_FAMILIES = ("single", "base", "lora", "ttft")


def loads(args) -> list[Load]:
    """The workloads of ``args`` (all of LOAD_FAMILIES unless ``args.llamacpp_loads`` names fewer)."""
    out = [Load("single", f"1 stream, {args.stream_tokens} tokens", 1, args.stream_tokens, args.prompt_tokens),
           Load("base", f"{args.clients} streams, {args.new_tokens} tokens, base", args.clients, args.new_tokens,
                args.prompt_tokens),
           Load("lora", f"{args.clients} streams, {args.clients} distinct LoRAs", args.clients, args.new_tokens,
                args.prompt_tokens, lora=True)]
    out += [Load(f"ttft-{n}", f"TTFT, {n:,}-token prompt (prompt tok/s)", 1, 1, n, ttft=True)
            for n in args.ttft_prompts]
    wanted = getattr(args, "llamacpp_loads", None) or LOAD_FAMILIES
    return [x for x in out if ("ttft" if x.ttft else x.key) in wanted]


def make_gguf(shipped: Path, file_type: str, out_dir: Path) -> Path:
    """The default model's file at ``file_type``: the shipped file, or it requantized by llama-quantize."""
    if file_type == SHIPPED:
        return shipped
    out = out_dir / f"{shipped.stem.rsplit('.', 1)[0]}.{file_type}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(llamacpp_bin("llama-quantize")), "--allow-requantize", str(shipped), str(out), file_type],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return out


def lora_ggufs(model: Path, loras: list, out_dir: Path) -> list[Path]:
    from loadtest.llamacpp_lora import convert

    config = json.loads((model / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    return [convert(spec.path, out_dir / f"{spec.name}.gguf", config["num_attention_heads"],
                    config["num_key_value_heads"]) for spec in loras]


def llama_fields(ids: dict[str, int]):
    """llama-server's way of naming a request's LoRA: its id in the server's list, at scale 1."""
    def fields(spec: RequestSpec) -> dict:
        if spec.adapters:
            raise ValueError("llama-server takes no adapter compositions here")
        return {"lora": [{"id": ids[spec.adapter], "scale": 1.0}]} if spec.adapter else {}
    return fields


class System:
    """One server under test and how to tell it a request's adapter."""

    def __init__(self, name: str, srv, fields=served.adapter_fields, erase: int = 0):
        self.name, self.srv, self.fields, self.erase = name, srv, fields, erase

    def batch(self, specs: list[RequestSpec]) -> tuple[list, float]:
        return asyncio.run(served.run_batch(self.srv.url, self.srv.base_model, specs, fields=self.fields))

    def measure(self, load: Load, specs: list[RequestSpec]) -> dict:
        results, wall = self.batch(specs)
        out = batch_summary(results, wall)
        if load.ttft:
            ok = [r for r in results if r.ok]
            seconds = ok[0].e2e if ok else None
            out.update(ttft_s=seconds, prompt_tokens=load.prompt_tokens,
                       tok_s=load.prompt_tokens / seconds if seconds else None)
            if self.erase:
                erase_slots(self.srv.url, self.erase)
        errors = {r.error for r in results if not r.ok}
        if errors:
            out["errors"] = sorted(errors)[:3]
        return out


def run_group(args, setup, group: Group, specs: dict[str, list[RequestSpec]], lora_files: list[Path],
              lora_names: list[str], gguf: Path, all_loads: list[Load], ttft_prompts) -> dict:
    rounds: list[dict] = []
    llama_name = f"llama.cpp {group.llama}"
    with contextlib.ExitStack() as stack:
        llama = stack.enter_context(llamacpp_peer(gguf, lora_files, setup.work / "logs" / f"llama-{group.llama}.log",
                                                  threads=args.threads, parallel=args.clients))
        systems = [System(llama_name, llama, llama_fields({n: i for i, n in enumerate(lora_names)}), args.clients)]
        for q in group.ours:
            srv = stack.enter_context(setup.server(f"ours-{q}", ["--quantization", q]))
            systems.insert(len(systems) - 1, System(f"ours {OURS.get(q, q)}", srv))
        argv = {s.name: s.srv.argv for s in systems}
        for s in systems:
            print(f"{s.name}: {' '.join(s.srv.argv)}", flush=True)
            for key in {x.key for x in all_loads} & {"single", "base", "lora"}:  # untimed: LoRAs into slots
                s.batch([replace(x, max_tokens=2) for x in specs[key]])
        load_before = os.getloadavg()
        for r in range(args.rounds):
            row: dict = {}
            order = all_loads[r % len(all_loads):] + all_loads[:r % len(all_loads)]
            for load in order:
                if load.ttft and r >= args.ttft_rounds:
                    continue
                work = ([RequestSpec(None, ttft_prompts(load.prompt_tokens, r), 1)] if load.ttft else specs[load.key])
                for s in (systems if r % 2 == 0 else systems[::-1]):
                    row[f"{s.name} | {load.key}"] = m = s.measure(load, work)
                    print(f"{group.llama} round {r + 1} {load.key} {s.name}: "
                          f"{m['tok_s'] if m['tok_s'] is None else round(m['tok_s'], 1)} tok/s"
                          + (f" ({m['ttft_s']:.2f} s)" if load.ttft and m.get("ttft_s") else "")
                          + (f" errors: {m['errors']}" if m.get("errors") else ""), flush=True)
            rounds.append(row)
        load_after = os.getloadavg()
    ours = [s.name for s in systems if s.name != llama_name]
    return {"llama": llama_name, "ours": ours, "argv": argv, "rounds": rounds,
            "loadavg_before": load_before, "loadavg_after": load_after,
            "summary": summarize(rounds, ours, llama_name, all_loads)}


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(rounds: list[dict], num: str, den: str) -> float | None:
    return _median(r[num]["tok_s"] / r[den]["tok_s"] for r in rounds
                   if r.get(num, {}).get("tok_s") and r.get(den, {}).get("tok_s"))


def summarize(rounds: list[dict], ours: list[str], llama: str, all_loads: list[Load]) -> list[dict]:
    rows = []
    for load in all_loads:
        target = TARGETS["ttft" if load.ttft else load.key]
        for name in ours:
            num, den = f"{name} | {load.key}", f"{llama} | {load.key}"
            ratio = _ratio(rounds, num, den)
            rows.append({"load": load.key, "label": load.label, "ours": name,
                         "ours_tok_s": _median(r[num]["tok_s"] for r in rounds if num in r),
                         "llama_tok_s": _median(r[den]["tok_s"] for r in rounds if den in r),
                         "ours_ttft_s": _median(r[num].get("ttft_s") for r in rounds if num in r),
                         "llama_ttft_s": _median(r[den].get("ttft_s") for r in rounds if den in r),
                         "ratio": ratio, "target": target, "met": None if ratio is None else ratio >= target,
                         "failed": sum(r[k].get("failed", 0) for r in rounds for k in (num, den) if k in r)})
    for name in ours:
        ratio = _ratio(rounds, f"{name} | lora", f"{name} | base")
        rows.append({"load": "lora/base", "label": f"{name}: 32 LoRAs / own base", "ours": name, "ratio": ratio,
                     "target": OWN_LORA_VS_BASE, "met": None if ratio is None else ratio >= OWN_LORA_VS_BASE})
    return rows


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def table(group_results: dict[str, dict]) -> str:
    lines = ["| precision | workload | ours | ours tok/s | llama-server tok/s | ours / llama-server | target | met |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for name, g in group_results.items():
        for row in g["summary"]:
            met = {True: "yes", False: "NO", None: "not measured"}[row["met"]]
            if row["load"] == "lora/base":
                lines.append(f"| {name} | 32 LoRAs / own base | {row['ours']} | | | {_f(row['ratio'])} | "
                             f">= {row['target']} | {met} |")
                continue
            lines.append(f"| {name} | {row['label']} | {row['ours']} | {_f(row['ours_tok_s'], 4)} | "
                         f"{_f(row['llama_tok_s'], 4)} | {_f(row['ratio'])} | >= {row['target']} | {met} |")
    return "\n".join(lines)


def run(args, setup) -> dict:
    """The whole --with-llamacpp benchmark (bench_served.main calls it like the other modes)."""
    from server.model.default_model import default_gguf_path

    shipped = default_gguf_path()
    factory = AdapterFactory(setup.model, setup.work / "adapters", rank=16, seed=1)
    loras = [factory.get("lora", i) for i in range(args.clients)]
    register(setup.store, loras)
    lora_files = lora_ggufs(setup.model, loras, setup.work / "lora-gguf")
    prompts = setup.prompts(args.clients, args.prompt_tokens)
    specs = {"single": [RequestSpec(None, prompts[0], args.stream_tokens)],
             "base": [RequestSpec(None, p, args.new_tokens) for p in prompts],
             "lora": [RequestSpec(s.name, p, args.new_tokens) for s, p in zip(loras, prompts)]}
    all_loads = loads(args)
    groups = {}
    for i, name in enumerate(args.llamacpp_precisions):
        group = GROUPS[name]
        if name == SHIPPED and args.llamacpp_int4_wo:
            group = replace(group, ours=group.ours + ("int4-wo",))
        gguf = make_gguf(shipped, group.llama, setup.work / "gguf")
        started = time.time()
        # a fresh prompt per (group, round, length): no prefix cache hit anywhere
        groups[name] = run_group(args, setup, group, specs, lora_files, [s.name for s in loras], gguf, all_loads,
                                 lambda n, r, i=i: setup.prompts(1, n, seed=1000 + 100 * i + r)[0])
        groups[name]["wall_s"] = round(time.time() - started, 1)
        print(f"{name}: load average before {groups[name]['loadavg_before']}, after {groups[name]['loadavg_after']}",
              flush=True)
    print(table(groups))
    return {"llamacpp_version": _llama_version(), "gguf": str(shipped), "groups": groups}


def _llama_version() -> str | None:
    version = llamacpp_bin("llama-server").parent.parent / "VERSION"
    return version.read_text().strip() if version.is_file() else None
