"""PNG figures for `rag-bench latency` and `rag-bench compare` (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from rag_service.bench.latency import decode

_LINES = {"p50": "-", "p90": "--", "p99": "-.", "p99.9": ":"}


def _percentile_spectrum(encoded: str) -> tuple[np.ndarray, np.ndarray]:
    """x = 1 / (1 - percentile) (so p99 sits at 100, p99.9 at 1000), y = latency ms: the usual HdrHistogram plot."""
    histogram = decode(encoded)
    xs, ys = [], []
    for item in histogram.get_percentile_iterator(5):
        level = item.percentile_level_iterated_to
        if level >= 100.0:
            break
        xs.append(1.0 / (1.0 - level / 100.0))
        ys.append(item.value_iterated_to / 1e3)
    return np.asarray(xs), np.asarray(ys)


def _spectrum_axes(ax) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000]
    ax.set_xticks(ticks, ["p0", "p50", "p90", "p99", "p99.9", "p99.99"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)


def latency_plots(report: dict, out_dir: Path, prefix: str = "latency") -> list[Path]:
    """Percentiles against offered rate (search and floor), and the latency distribution at each rate."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["rates"]
    rates = [row["offered_qps"] for row in rows]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, color in (("search", "tab:blue"), ("floor", "tab:gray")):
        if not all(kind in row for row in rows):
            continue
        for p, style in _LINES.items():
            ax.plot(rates, [row[kind]["latency_ms"][p] for row in rows], style, color=color, marker="o",
                    label=f"{kind} {p}")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("latency (ms, from scheduled send)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Search latency vs offered rate (open loop); floor = health Check")
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_percentiles.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(rows)))
    for row, color in zip(rows, colors):
        for kind, style in (("search", "-"), ("floor", ":")):
            if kind in row and row[kind]["ok"]:
                xs, ys = _percentile_spectrum(row[kind]["histogram"])
                ax.plot(xs, ys, style, color=color, label=f"{kind} @ {row['offered_qps']:g}/s")
    _spectrum_axes(ax)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Latency distribution per offered rate")
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_distribution.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def compare_plots(report: dict, out_dir: Path, prefix: str = "compare") -> list[Path]:
    """p50 / p99 per system (bars), and each system's latency distribution."""
    out_dir.mkdir(parents=True, exist_ok=True)
    systems = report["systems"]
    names = list(systems)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(names))
    p50 = [systems[n]["latency_ms"]["p50"] for n in names]
    p99 = [systems[n]["latency_ms"]["p99"] for n in names]
    ax.bar(x - 0.2, p50, 0.4, label="p50")
    ax.bar(x + 0.2, p99, 0.4, label="p99")
    for xi, (a, b) in enumerate(zip(p50, p99)):
        ax.text(xi - 0.2, a, f"{a:.1f}", ha="center", va="bottom", fontsize=7)
        ax.text(xi + 0.2, b, f"{b:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=15, fontsize=8)
    ax.set_ylabel("latency per query (ms), one client")
    ax.set_title(f"{report['corpus']['name']}: {report['queries']} queries, interleaved")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_latency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        xs, ys = _percentile_spectrum(systems[name]["histogram"])
        ax.plot(xs, ys, label=name)
    _spectrum_axes(ax)
    ax.legend(fontsize=8)
    ax.set_title("Latency distribution per system")
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_distribution.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def scale_plots(report: dict, out_dir: Path) -> list[Path]:
    """The scale figures in `out_dir`, like latency_plots and compare_plots."""
    return [scale_plot(report, out_dir / "scale_p99.png")]


def scale_plot(report: dict, out_path: Path) -> Path:
    """p99 (and p50) against corpus size, one line per system."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    runs = report["runs"]
    sizes = [run["passages"] for run in runs]
    # A system left out of some sizes (it did not fit) is drawn over the sizes it ran at.
    names = list(dict.fromkeys(name for run in runs for name in run["systems"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        ran = [(size, run["systems"][name]["latency_ms"]) for size, run in zip(sizes, runs) if name in run["systems"]]
        xs = [size for size, _ in ran]
        line = ax.plot(xs, [lat["p99"] for _, lat in ran], "-o", label=f"{name} p99")[0]
        ax.plot(xs, [lat["p50"] for _, lat in ran], ":", alpha=0.6, color=line.get_color(), label=f"{name} p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("passages")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Latency against corpus size (synthetic corpora)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
