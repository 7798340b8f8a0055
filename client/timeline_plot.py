"""The comparison's timeline figure: what the scheduler did, one panel per policy on a shared time axis, drawn from
each server's GET /timeline (saved by experiment.py as `timeline_<policy>.json`).

In a panel a row is a request, in arrival order from the top: grey while it waits, orange while its prompt is
prefilled, blue while it decodes; a black mark where it finishes, a red one where it is preempted. Above the rows,
how many requests ran (blue) and waited (grey line) at each step. Time 0 is the first request's arrival on each
server. No batching draws a staircase, static batching convoys, dynamic batching continuous admission.

    python client/timeline_plot.py results        # -> results/timeline.png/.pdf from results/timeline_*.json
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib.patches as mpatches
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

import plot
from plot import label_and_color, ordered

# the live page's colours (static/live.css)
PHASE_COLORS = {"waiting": "#c9c9c9", "preempted": "#c9c9c9", "prefill": "#f28e2b", "decoding": "#4e79a7"}
FINISHED_COLOR, PREEMPTED_COLOR, WAITING_LINE = "#222222", "#d62728", "#7f7f7f"
IDLE_GAP_S = 0.25  # a pause this long between two steps is drawn as idle (no running, no waiting)
POLICY_RULES = {"nobatch": "one request at a time",
                "static": "a batch forms when nothing runs; nothing joins until its longest member is done",
                "dynamic": "waiting requests join the running batch at the next step"}


def first_arrival(timeline: dict) -> float:
    return min((r["arrival"] for r in timeline.get("requests", [])), default=0.0)


def step_curves(steps: list[dict], t0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stair edges and the running and waiting counts between them; a step lasts until the next one starts
    unless the engine idled in between."""
    edges, running, waiting = [], [], []
    for step, following in zip(steps, steps[1:] + [None]):
        start, end = step["start"] - t0, step["start"] + step["duration"] - t0
        edges.append(start)
        running.append(step["running"])
        waiting.append(step["waiting"])
        if following is not None and following["start"] - t0 - end > IDLE_GAP_S:
            edges.append(end)
            running.append(0)
            waiting.append(0)
        elif following is None:
            edges.append(end)
    return np.asarray(edges), np.asarray(running), np.asarray(waiting)


def draw_counts(ax: plt.Axes, timeline: dict, t0: float) -> None:
    steps = timeline.get("steps", [])
    if len(steps) > 0:
        edges, running, waiting = step_curves(steps, t0)
        ax.stairs(running, edges, fill=True, color=PHASE_COLORS["decoding"], label="running")
        ax.stairs(waiting, edges, color=WAITING_LINE, linewidth=1.2, label="waiting")
        ax.legend(loc="upper right", fontsize=7, frameon=False, ncols=2)
    ax.set_ylabel("requests", fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=3))
    ax.tick_params(labelsize=8)


def draw_rows(ax: plt.Axes, timeline: dict, t0: float) -> None:
    """A row per request: its phases as bars, marks where it finished or was preempted."""
    requests = sorted(timeline.get("requests", []), key=lambda r: (r["arrival"], r["id"]))
    segments, marks = [], []  # (row, start, width, colour), (row, time, colour)
    for row, r in enumerate(requests):
        for (t, phase), following in zip(r["phases"], r["phases"][1:] + [None]):
            if phase == "finished":
                marks.append((row, t - t0, FINISHED_COLOR))
                continue
            if phase == "preempted":
                marks.append((row, t - t0, PREEMPTED_COLOR))
            end = following[0] if following else timeline["now"]  # still in this phase when the record was read
            segments.append((row, t - t0, end - t, PHASE_COLORS[phase]))
    if segments:
        rows, lefts, widths, colors = zip(*segments)
        ax.barh(rows, widths, left=lefts, height=0.8, color=colors, linewidth=0)
    if marks:
        rows, times, colors = zip(*marks)
        ax.vlines(times, np.subtract(rows, 0.45), np.add(rows, 0.45), colors=colors, linewidth=1.2)
    if requests:
        ax.set_ylim(len(requests) - 0.5, -0.5)  # the first arrival on top
    else:
        ax.text(0.5, 0.5, "no timeline recorded", transform=ax.transAxes, ha="center", color="gray")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("request (arrival order)", fontsize=8)
    ax.tick_params(labelsize=8)


def plot_timelines(timelines: dict[str, dict], stem: Path, caption: str = "") -> list[Path]:
    """One panel per policy (counts above, rows below), every panel on the same time axis."""
    policies = ordered(timelines)
    fig = plt.figure(figsize=(12, 0.8 + 3.6 * len(policies)), layout="constrained")
    grid = fig.add_gridspec(2 * len(policies), 1, height_ratios=[1, 3.6] * len(policies))
    first = None
    for i, policy in enumerate(policies):
        counts = fig.add_subplot(grid[2 * i], sharex=first, sharey=first)
        rows = fig.add_subplot(grid[2 * i + 1], sharex=counts)
        first = first or counts
        t0 = first_arrival(timelines[policy])
        draw_counts(counts, timelines[policy], t0)
        draw_rows(rows, timelines[policy], t0)
        label, color = label_and_color(policy)
        rule = POLICY_RULES.get(policy)
        counts.set_title(f"{label}: {rule}" if rule else label, loc="left", fontsize=10, color=color,
                         fontweight="bold")
        counts.tick_params(labelbottom=False)
        rows.tick_params(labelbottom=i == len(policies) - 1)
    rows.set_xlabel("seconds since the first request arrived")
    first.set_xlim(left=0)
    legend = [mpatches.Patch(color=PHASE_COLORS[p], label=p) for p in ("waiting", "prefill", "decoding")]
    legend += [plt.Line2D([], [], color=c, marker="|", linestyle="", markersize=10, label=name)
               for name, c in (("finished", FINISHED_COLOR), ("preempted", PREEMPTED_COLOR))]
    fig.suptitle("What the scheduler did: a row per request, the batch per step", fontsize=12)
    fig.legend(handles=legend, loc="outside lower center", ncols=5, fontsize=9, frameon=False)
    return plot.save_figure(fig, stem, caption)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw timeline.png/.pdf from the timeline_<policy>.json of a run.")
    parser.add_argument("directory", type=Path, help="a comparison's output directory")
    args = parser.parse_args(argv)
    files = sorted(args.directory.glob("timeline_*.json"))
    if not files:
        print(f"error: no timeline_<policy>.json in {args.directory}", file=sys.stderr)
        return 1
    timelines = {f.stem.removeprefix("timeline_"): json.loads(f.read_text()) for f in files}
    for path in plot_timelines(timelines, args.directory / "timeline"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
