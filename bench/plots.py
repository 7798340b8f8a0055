"""One PNG per benchmark, drawn from its JSON alone (matplotlib, Agg). Where matplotlib is missing (a bare GPU
machine) the plot is skipped with a note; `python -m bench report` draws it later from the JSON."""
from collections import defaultdict
from collections.abc import Callable


def draw(data: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path} not drawn (python -m bench report redraws it)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = DRAW[data["benchmark"]](plt, data)
    info = data["info"]
    fig.suptitle(f"{data['benchmark']}: {info['model']} ({info['weights']}), {info['dtype']}, {info['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(plt, rows: list[dict], group: Callable[[dict], float | None], label: str, ylabel: str):
    """Output tokens/s as grouped bars: one group per workload, one bar per system at the mean of its repeats,
    with their range as an error bar; a system that ran fewer of the workload's requests says how many."""
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        done = [r for r in rows if r["workload"] == workload and group(r) is not None]
        requests = max((r["requests"] for r in done), default=0)
        runs: dict[str, list[float]] = {}
        for r in done:
            name = r[label] if r["requests"] == requests else f"{r[label]}\n(first {r['requests']})"
            runs.setdefault(name, []).append(group(r))
        means = [sum(v) / len(v) for v in runs.values()]
        spread = [[m - min(v) for m, v in zip(means, runs.values())],
                  [max(v) - m for m, v in zip(means, runs.values())]]
        bars = ax.bar(list(runs), means, yerr=spread, capsize=4,
                      color=["C0" if n.startswith(("ours", "nobatch", "static", "dynamic")) else "C7" for n in runs])
        ax.bar_label(bars, fmt="%.0f", padding=3)
        ax.margins(y=0.15)
        ax.set_title(f"{workload} ({requests} requests)")
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=30)
    return fig


def throughput(plt, data: dict):
    return _bars(plt, data["results"], lambda r: r.get("output_tokens_per_s"), "system", "output tokens/s")


def http(plt, data: dict):
    return _bars(plt, data["results"], lambda r: r["metrics"]["output_tokens_per_s"] if "metrics" in r else None,
                 "policy", "output tokens/s (HTTP)")


def scale(plt, data: dict):
    return _bars(plt, data["results"], lambda r: r.get("output_tokens_per_s"), "system", "output tokens/s (HTTP)")


def decode(plt, data: dict):
    rows = data["results"]
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("step_ms", "ours: engine step", "o-"), ("forward_ms", "ours: model forward", "o--"),
                              ("hf_step_ms", "HF transformers decode step", "^-"),
                              ("ideal_eager_ms", "idealised step, eager", "s:"),
                              ("ideal_graph_ms", "idealised step, CUDA graph", "s-"),
                              ("roofline_ms", "roofline (weights + KV / copy bandwidth)", "k-")):
        points = [(r["batch"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel(f"batch (context {rows[0]['ctx'] if rows else '?'})")
    ax.set_ylabel("ms per decode step")
    ax.legend(fontsize=8)
    return fig


def prefill(plt, data: dict):
    """Each run's share of the matmul peak (beside the 55% target) and its prompt tokens/s by prompt length, the
    repeats' means joined."""
    rows = [r for r in data["results"] if "error" not in r]
    lengths = sorted({r["prompt_tokens"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, scale, ylabel, top in ((axes[0], "of_matmul_peak", 100, "% of the matmul peak", 100),
                                        (axes[1], "tokens_per_s", 1, "prompt tokens/s", 0)):
        runs = defaultdict(list)
        for r in rows:
            runs[r["prompt_tokens"]].append(r[key] * scale)
        ax.plot([n for n in lengths for _ in runs[n]], [v for n in lengths for v in runs[n]], "o", color="C0",
                alpha=0.5)
        ax.plot(lengths, [sum(runs[n]) / len(runs[n]) for n in lengths], "-", color="C0")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel(f"prompt tokens ({rows[0]['requests'] if rows else '?'} prompts each)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max([top] + [1.15 * v for values in runs.values() for v in values]))
    axes[0].axhline(55, color="C3", linestyle="--", label="target: 55% of the matmul peak")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"matmul peak {data['matmul_peak_tflops']:.3g} TFLOP/s")
    return fig


def longtail_run(row: dict) -> str:
    """'in-process', 'HTTP', or with the server's STREAM_INTERVAL_MS where a run set it: 'HTTP, 20 ms'."""
    if not row["over_http"]:
        return "in-process"
    return "HTTP" if row.get("stream_interval_ms") is None else f"HTTP, {row['stream_interval_ms']:g} ms"


def longtail(plt, data: dict):
    """Achieved output tokens/s in-process and over HTTP, each beside the bound of the schedule and the target (70%
    of it)."""
    rows = [r for r in data["results"] if r.get("output_tokens_per_s") is not None]
    names = [longtail_run(r) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(rows))
    achieved = ax.bar([i - 0.2 for i in x], [r["output_tokens_per_s"] for r in rows], 0.4, color="C0",
                      label="achieved")
    bound = ax.bar([i + 0.2 for i in x], [r["bound_tokens_per_s"] for r in rows], 0.4, color="C7", label="bound")
    ax.bar_label(achieved, labels=[f"{r['output_tokens_per_s']:.0f}\n{r['of_bound']:.0%}" for r in rows], fontsize=8)
    ax.bar_label(bound, fmt="%.0f", fontsize=8)
    ax.hlines([0.7 * r["bound_tokens_per_s"] for r in rows], [i - 0.4 for i in x], [i + 0.4 for i in x], color="C3",
              linestyle="--", label="target: 70% of the bound")
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1.4 * max([1] + [r["bound_tokens_per_s"] for r in rows]))  # room for the legend above the bars
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"long-tailed burst ({rows[0]['requests'] if rows else '?'} requests)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    return fig


def poisson(plt, data: dict):
    figures = (("ttft_s", "p99 TTFT (s)", "p99"), ("tpot_s", "p99 TPOT (s)", "p99"), ("itl_s", "p99 ITL (s)", "p99"),
               ("e2e_s", "p99 E2E latency (s)", "p99"), ("output_tokens_per_s", "output tokens/s", None),
               ("goodput_requests_per_s", "goodput (requests/s in SLO)", None))
    by_policy = defaultdict(list)
    for r in data["results"]:
        if "metrics" in r:
            by_policy[r["policy"]].append(r)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title, percentile) in zip(axes.flat, figures):
        for policy, rows in by_policy.items():
            values = [r["metrics"][key] for r in rows]
            points = [(r["qps"], v[percentile] if percentile else v) for r, v in zip(rows, values)]
            points = [(q, v) for q, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered QPS")
        ax.set_title(title)
        if percentile:
            ax.set_yscale("log")
    axes.flat[0].legend()
    return fig


def interference(plt, data: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    percentiles = ("p50", "p90", "p99")
    width = 0.8 / max(len(data["results"]), 1)
    for i, r in enumerate(data["results"]):
        label = f"{r['prefill']} prefill (MAX_STEP_TOKENS={r['max_step_tokens']})"
        timeline = r["decode_itl_timeline"]
        left.plot(timeline["t"], [x * 1e3 for x in timeline["itl"]], ".", markersize=3, label=label, color=f"C{i}")
        for t in r["long_prompt_arrivals"]:
            left.axvline(t, color=f"C{i}", alpha=0.2)
        bars = right.bar([j + i * width for j in range(len(percentiles))],
                         [r["decode_itl_s"][p] * 1e3 for p in percentiles], width, label=label, color=f"C{i}")
        right.bar_label(bars, fmt="%.1f")
    left.set_xlabel("seconds (vertical lines: long prompts arrive)")
    left.set_ylabel("inter-token latency of running decodes (ms)")
    left.legend(fontsize=8)
    right.set_xticks([j + width * (len(data["results"]) - 1) / 2 for j in range(len(percentiles))], percentiles)
    right.set_ylabel("ITL of running decodes (ms)")
    right.legend(fontsize=8)
    return fig


def timeline_overhead(plt, data: dict):
    """The recorder's share of step time per case, beside the 2% budget."""
    rows = data["results"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar([r["case"] for r in rows], [100 * r["recorder_share"] for r in rows], color="C0")
    ax.bar_label(bars, labels=[f"{100 * r['recorder_share']:.3f}%\n{r['recorder_us_per_step']:.0f} µs/step"
                               for r in rows], fontsize=8)
    ax.axhline(2, color="C3", linestyle="--", label="budget: 2% of step time")
    ax.set_ylim(0, 2.5)
    ax.set_ylabel("recording / step time (%)")
    ax.legend(fontsize=8)
    return fig


def prefix(plt, data: dict):
    """Prompt + output tokens/s per workload, our engine with the prefix cache on and off (and HF with its block
    sharing on)."""
    rows = [{**r, "label": f"{r['system']}\ncaching {'on' if r['prefix_caching'] else 'off'}"} for r in data["results"]]
    return _bars(plt, rows, lambda r: r.get("total_tokens_per_s"), "label", "prompt + output tokens/s")


DRAW = {"throughput": throughput, "http": http, "scale": scale, "decode": decode, "prefill": prefill,
        "longtail": longtail, "poisson": poisson,
        "interference": interference, "timeline-overhead": timeline_overhead, "prefix": prefix}
