"""The comparison's timeline figure: what the scheduler did, one panel per policy on a shared time axis, drawn from
each server's GET /timeline (saved by experiment.py as `timeline_<policy>.json`: a list of the server's engines'
records, in engine order; a file of a single record, as older runs saved, is a server of one engine).

In a panel a row is a request, in arrival order from the top: grey while it waits, orange while its prompt is
prefilled, blue while it decodes; a black mark where it finishes, a red one where it is preempted. A green
triangle at its admission says that part of its prompt was found in the prefix cache: those tokens took no time, so
they have no width, and its orange bar is the rest of the prompt. Above the rows, how many requests ran (blue) and
waited (grey line) at each step; the lane's title on the right gives the share of prompt tokens that came from the
prefix cache (none where nothing did, as in records from before prefix caching, which have no cached_tokens). A
server of several engines gets a lane (counts and rows) per engine in its panel, each engine's requests in its own
lane. Time 0 is the first request's arrival on each server. No batching draws a staircase, static batching
convoys, dynamic batching continuous admission.

    python client/timeline_plot.py results        # -> results/timeline.png/.pdf from results/timeline_*.json
"""
import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as a script (python client/timeline_plot.py): the package from the checkout
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from client import plot  # noqa: E402
from client.plot import label_and_color, ordered  # noqa: E402

# the live page's colours (static/live.css)
PHASE_COLORS = {"waiting": "#c9c9c9", "preempted": "#c9c9c9", "prefill": "#f28e2b", "decoding": "#4e79a7"}
FINISHED_COLOR, PREEMPTED_COLOR, WAITING_LINE, CACHE_HIT_COLOR = "#222222", "#d62728", "#7f7f7f", "#2ca02c"
CACHE_HITS = "prefix-cache hits"  # the gid of a lane's hit marks (tests find them by it)
IDLE_GAP_S = 0.25  # a pause this long between two steps is drawn as idle (no running, no waiting)
POLICY_RULES = {"nobatch": "one request at a time",
                "static": "a batch forms when nothing runs; nothing joins until its longest member is done",
                "dynamic": "waiting requests join the running batch at the next step"}


def engine_records(saved: dict | list[dict]) -> list[dict]:
    """A server's records, one per engine: a saved list as it is, a single record (one engine) as a list of one."""
    if isinstance(saved, dict):
        return [saved]
    return saved or [{}]  # nothing recorded: one empty lane


def engine_zeros(engines: list[dict]) -> list[float]:
    """Each engine's time 0 on its own clock: the server's first arrival, on any engine. An engine counts its times
    from its own origin; origin_unix, that origin's wall-clock time, puts them all on one clock."""
    base = min(e.get("origin_unix", 0.0) for e in engines)
    offsets = [e.get("origin_unix", 0.0) - base for e in engines]
    first = min((r["arrival"] + offset for e, offset in zip(engines, offsets) for r in e.get("requests", [])),
                default=0.0)
    return [first - offset for offset in offsets]


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


def cache_share(steps: list[dict]) -> float | None:
    """The share of prompt tokens found in the prefix cache (cached / (cached + computed)) over the steps; None if
    none was, as in records from before prefix caching."""
    cached = sum(s.get("cached_tokens", 0) for s in steps)
    return cached / (cached + sum(s["prefill_tokens"] for s in steps)) if cached else None


def has_cache_hits(requests: list[dict]) -> bool:
    return any(r.get("cached_tokens") for r in requests)  # older records have none: no hits


def draw_cache_hits(ax: plt.Axes, requests: list[dict], t0: float) -> None:
    """A triangle at the admission of each request that found part of its prompt in the prefix cache: a point, not
    a bar, since the cached tokens took no time."""
    hits = [(r["admitted"] - t0, row) for row, r in enumerate(requests) if r.get("cached_tokens")]
    if hits:
        times, rows = zip(*hits)
        ax.scatter(times, rows, marker=">", s=20, color=CACHE_HIT_COLOR, linewidths=0, zorder=3, gid=CACHE_HITS)


def draw_rows(ax: plt.Axes, timeline: dict, t0: float) -> None:
    """A row per request: its phases as bars, marks where it finished or was preempted or found cached tokens."""
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
    draw_cache_hits(ax, requests, t0)
    if requests:
        ax.set_ylim(len(requests) - 0.5, -0.5)  # the first arrival on top
    else:
        ax.text(0.5, 0.5, "no timeline recorded", transform=ax.transAxes, ha="center", color="gray")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("request (arrival order)", fontsize=8)
    ax.tick_params(labelsize=8)


class Lane(NamedTuple):
    """An engine's part of a policy's panel."""
    policy: str
    engine: int
    record: dict  # the engine's /timeline
    zero: float  # time 0 on the engine's clock
    height: float  # inches


def lanes_of(timelines: dict[str, dict | list[dict]]) -> list[Lane]:
    """Every policy's lanes, policy by policy in the story's order, engine by engine."""
    lanes = []
    for policy in ordered(timelines):
        records = engine_records(timelines[policy])
        height = 3.6 / len(records) ** 0.5  # one engine's as tall as ever; several shorter, the figure printable
        lanes += [Lane(policy, engine, record, zero, height)
                  for engine, (record, zero) in enumerate(zip(records, engine_zeros(records)))]
    return lanes


def lane_note(lane: Lane, several: bool) -> str:
    """The right-hand title of a lane: its engine where the server has several, its prefix-cache share if any."""
    share = cache_share(lane.record.get("steps", []))
    notes = [f"engine {lane.engine}"] if several else []
    notes += [f"{share:.0%} of prompt tokens from the prefix cache"] if share is not None else []
    return " · ".join(notes)


def legend_handles(cache_hits: bool) -> list:
    handles = [mpatches.Patch(color=PHASE_COLORS[p], label=p) for p in ("waiting", "prefill", "decoding")]
    handles += [plt.Line2D([], [], color=c, marker="|", linestyle="", markersize=10, label=name)
                for name, c in (("finished", FINISHED_COLOR), ("preempted", PREEMPTED_COLOR))]
    if cache_hits:  # only where there are some: older records have none
        handles.append(plt.Line2D([], [], color=CACHE_HIT_COLOR, marker=">", linestyle="", markersize=7,
                                  label="prefix-cache hit (admitted with cached tokens)"))
    return handles


def plot_timelines(timelines: dict[str, dict | list[dict]], stem: Path, caption: str = "") -> list[Path]:
    """timeline.png and .pdf at `stem`: the figure of timeline_figure with `caption` at the bottom."""
    return plot.save_figure(timeline_figure(timelines), stem, caption)


def timeline_figure(timelines: dict[str, dict | list[dict]]) -> plt.Figure:
    """One panel per policy, every panel on the same time axis; in a panel a lane per engine of its server (counts
    above, rows below). `timelines`: each policy's saved /timeline, a list of records or a single one."""
    lanes = lanes_of(timelines)
    several = {lane.policy for lane in lanes if lane.engine > 0}
    fig = plt.figure(figsize=(12, 0.8 + sum(lane.height for lane in lanes)), layout="constrained")
    grid = fig.add_gridspec(2 * len(lanes), 1, height_ratios=[part * lane.height for lane in lanes
                                                              for part in (1, 3.6)])
    first = None
    for i, lane in enumerate(lanes):
        policy, engine, record, zero, _ = lane
        counts = fig.add_subplot(grid[2 * i], sharex=first, sharey=first)
        rows = fig.add_subplot(grid[2 * i + 1], sharex=counts)
        first = first or counts
        draw_counts(counts, record, zero)
        draw_rows(rows, record, zero)
        if engine == 0:
            label, color = label_and_color(policy)
            rule = POLICY_RULES.get(policy)
            counts.set_title(f"{label}: {rule}" if rule else label, loc="left", fontsize=10, color=color,
                             fontweight="bold")
        if note := lane_note(lane, policy in several):
            counts.set_title(note, loc="right", fontsize=9, color="dimgray")
        counts.tick_params(labelbottom=False)
        rows.tick_params(labelbottom=i == len(lanes) - 1)
    rows.set_xlabel("seconds since the first request arrived")
    first.set_xlim(left=0)
    legend = legend_handles(any(has_cache_hits(lane.record.get("requests", [])) for lane in lanes))
    # the title and the legend at the top, the caption alone at the bottom: constrained layout makes room for an
    # outside legend but not beside a caption (supxlabel), which it would cover
    fig.legend(handles=legend, loc="outside upper center", ncols=len(legend), fontsize=9, frameon=False,
               title="What the scheduler did: a row per request, the batch per step", title_fontsize=12)
    return fig


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
