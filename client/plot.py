"""Figures of a comparison, drawn from plain data (CSV rows or lists of numbers); nothing here talks to a server.

The original figure is latency vs requested tokens, one line per policy, from `token_data_<policy>.csv`:

    python client/plot.py client/results                   # -> client/results/latency_vs_tokens.png/.pdf

`experiment.py` also draws wall-clock throughput and the TTFT / TPOT / E2E distributions with the functions below,
each with a caption naming the model, device and workload, so a figure read alone still says what it shows.
Latencies that span orders of magnitude across policies (TTFT: tens of ms to a minute) go on a log axis, with
each policy's median written beside its box. Every figure is written as PNG and PDF.
"""
import argparse
import csv
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402

CLIENT_DIR = Path(__file__).resolve().parent
# The original figure's labels and colours.
POLICY_STYLE = {"nobatch": ("No batch", "tab:blue"), "static": ("Static", "tab:green"),
                "dynamic": ("Dynamic", "tab:red")}


def ordered(policies) -> list[str]:
    """nobatch, static, dynamic first (the story's order), anything else after, alphabetically."""
    known = [p for p in POLICY_STYLE if p in policies]
    return known + sorted(p for p in policies if p not in POLICY_STYLE)


def label_and_color(policy: str) -> tuple[str, str | None]:
    return POLICY_STYLE.get(policy, (policy, None))


def read_latency_csv(path: Path) -> list[tuple[int, float]]:
    """(num_tokens, mean latency) rows of a `token_data_<policy>.csv`, sorted by num_tokens."""
    with open(path, newline="") as f:
        return sorted((int(row["num_tokens"]), float(row["latency"])) for row in csv.DictReader(f))


def save_figure(fig: plt.Figure, stem: Path, caption: str = "") -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"]
    if fig.get_layout_engine() is not None:  # a constrained figure places its own parts, the caption too
        if caption:
            fig.supxlabel(caption, fontsize=7)
    else:
        if caption:
            fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7, wrap=True)
        fig.tight_layout(rect=(0, 0.06 if caption else 0, 1, 1))
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def plot_latency_vs_tokens(curves: dict[str, list[tuple[int, float]]], stem: Path, caption: str = "") -> list[Path]:
    fig, ax = plt.subplots()
    for policy in ordered(curves):
        label, color = label_and_color(policy)
        num_tokens, latency = zip(*curves[policy]) if curves[policy] else ((), ())
        ax.plot(num_tokens, latency, marker="o", label=label, color=color)
    ax.set_xlabel("# tokens requested")
    ax.set_ylabel("request latency (s)")
    ax.set_title("Latency vs Requested Tokens")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, stem, caption)


def plot_throughput(tokens_per_s: dict[str, float], stem: Path, caption: str = "") -> list[Path]:
    policies = ordered(tokens_per_s)
    fig, ax = plt.subplots()
    bars = ax.bar([label_and_color(p)[0] for p in policies], [tokens_per_s[p] for p in policies],
                  color=[label_and_color(p)[1] for p in policies])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Wall-clock throughput (first request sent to last response)")
    return save_figure(fig, stem, caption)


def draw_distribution(samples: dict[str, list[float]], ylabel: str, title: str, log: bool = False) -> plt.Figure:
    """A box per policy (median, quartiles, mean as a triangle) with every request drawn as a dot; on a log
    axis, each median is also written beside its box, since the eye cannot read values off a log scale."""
    policies = ordered(samples)
    fig, ax = plt.subplots()
    black = {"color": "black", "markerfacecolor": "black", "markeredgecolor": "black"}
    ax.boxplot([samples[p] for p in policies], showmeans=True, showfliers=False, medianprops=black, meanprops=black)
    for i, policy in enumerate(policies, start=1):
        ax.scatter([i] * len(samples[policy]), samples[policy], s=8, alpha=0.5, color=label_and_color(policy)[1])
        if log and samples[policy]:
            median = float(np.median(samples[policy]))
            ax.annotate(f"median {median:.3g} s", (i, median), xytext=(28, 0), textcoords="offset points",
                        va="center", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(1, len(policies) + 1), [label_and_color(p)[0] for p in policies])
    ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
    ax.set_title(title)
    return fig


def plot_distribution(samples: dict[str, list[float]], ylabel: str, title: str, stem: Path, caption: str = "",
                      log: bool = False) -> list[Path]:
    return save_figure(draw_distribution(samples, ylabel, title, log), stem, caption)


def latency_csvs(paths: list[Path]) -> dict[str, Path]:
    """Policy name -> CSV, from files or directories holding `token_data_<policy>.csv`."""
    files = [f for p in paths for f in (sorted(p.glob("token_data_*.csv")) if p.is_dir() else [p])]
    return {f.stem.removeprefix("token_data_"): f for f in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot latency vs requested tokens for each policy on one figure.")
    parser.add_argument("paths", nargs="*", type=Path, default=[CLIENT_DIR / "results"],
                        help="token_data_<policy>.csv files or directories holding them")
    parser.add_argument("--out", type=Path, help="output path without suffix (default: <first dir>/latency_vs_tokens)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"error: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return 1
    csvs = latency_csvs(args.paths)
    if not csvs:
        print(f"error: no token_data_<policy>.csv in {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    first = args.paths[0]
    stem = args.out or (first if first.is_dir() else first.parent) / "latency_vs_tokens"
    for path in plot_latency_vs_tokens({policy: read_latency_csv(f) for policy, f in csvs.items()}, stem):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
