"""PNG plots of a harness run: throughput and latency against adapter count, and against skew.

The harness writes them at the end of a run; to redraw them from a saved run::

    python -m loadtest.plots results/bench-.../results.json [--out DIR]
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)

STYLE = {  # label -> (colour, marker, line style)
    "ours/base": ("#7f7f7f", "s", "--"),
    "ours/lora": ("#1f77b4", "o", "-"),
    "ours/mixed": ("#2ca02c", "^", "-"),
    "peft/lora": ("#d62728", "v", "-"),
    "vllm/lora": ("#9467bd", "D", "-"),
}


def _series(rows: list[dict], skew: float) -> dict[str, list[dict]]:
    """Rows at ``skew`` grouped by ``system/workload``, sorted by adapter count."""
    out: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["workload"] == "base" or abs(row["skew"] - skew) < 1e-9:
            out[row["label"]].append(row)
    return {k: sorted(v, key=lambda r: r["adapters"]) for k, v in out.items()}


def _style(label: str):
    return STYLE.get(label, (None, "o", "-"))


def _by_count(ax, series: dict[str, list[dict]], key: str, title: str, ylabel: str, suffix: str = "",
              line: str | None = None) -> None:
    for label, rows in series.items():
        xs = [r["adapters"] for r in rows if r.get(key) is not None]
        ys = [r[key] for r in rows if r.get(key) is not None]
        if not xs:
            continue
        colour, marker, default_line = _style(label)
        ax.plot(xs, ys, marker=marker, linestyle=line or default_line, color=colour, label=label + suffix)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters registered (N)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)


def plot_all(rows: list[dict], out_dir: Path, *, peer_skew: float, skews: list[float],
             subtitle: str = "") -> list[Path]:
    """Write the plots for ``rows`` (the harness's result rows) into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    series = _series(rows, peer_skew)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _by_count(axes[0], series, "throughput_tok_s", "Generated tokens per second", "tokens/s")
    _by_count(axes[1], series, "throughput_req_s", "Requests per second", "requests/s")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Throughput against adapter count (Zipf skew {peer_skew:g}) {subtitle}", fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "throughput_vs_adapters.png"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, title in ((axes[0], "ttft", "Time to first token"), (axes[1], "itl", "Inter-token latency")):
        for pct, line in (("p50", "-"), ("p99", ":")):
            _by_count(ax, series, f"{metric}_{pct}", f"{title} (solid p50, dotted p99)", "seconds",
                      suffix=f" {pct}", line=line)
    for ax in axes:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"Latency against adapter count (Zipf skew {peer_skew:g}) {subtitle}", fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "latency_vs_adapters.png"))

    mixed = [r for r in rows if r["label"] == "ours/mixed"]
    if len(skews) > 1 and mixed:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for count in sorted({r["adapters"] for r in mixed}):
            pts = sorted((r for r in mixed if r["adapters"] == count), key=lambda r: r["skew"])
            for ax, key in zip(axes, ("throughput_tok_s", "ttft_p99", "adapter_cache_hit_rate")):
                xs = [r["skew"] for r in pts if r.get(key) is not None]
                ax.plot(xs, [r[key] for r in pts if r.get(key) is not None], marker="o", label=f"N={count}")
        for ax, title, ylabel in zip(axes, ("Throughput", "TTFT p99", "Adapter slot hit rate"),
                                     ("tokens/s", "seconds", "hits / (hits + misses)")):
            ax.set_xlabel("Zipf skew (0 = uniform)")
            ax.set_title(f"ours/mixed: {title}")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Against popularity skew {subtitle}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "vs_skew.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Redraw the plots of a harness run from its results.json")
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: next to results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    saved = json.loads(args.results.read_text())
    config = saved["config"]
    plot_all(saved["rows"], args.out or args.results.parent, peer_skew=config["peer_skew"], skews=config["skews"],
             subtitle=f"[{Path(config['model_path']).name}, {config['mode']}, max_tokens {config['max_tokens']}]")


if __name__ == "__main__":
    main()
