"""The comparison: the same seeded workload against nobatch, static and dynamic batching, one fresh server each.

For every policy it starts `./server.sh POLICY` on a free port, waits for `/health`, runs the client's workload,
reads `/stats` and `/timeline` and stops the server. Then it writes into --out: the original latency-vs-tokens
figure, wall-clock throughput, TTFT / TPOT / E2E distributions and the scheduler's timeline (PNG + PDF), the raw
data behind them, and `report.md`.

    python client/experiment.py            # CPU: gpt2, random weights, 40 requests; GPU: gpt2-medium, 100 requests

However the command ends (done, failed, Ctrl-C, SIGTERM, SIGHUP, even SIGKILL), its server ends with it.
"""
import argparse
import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python client/experiment.py): the package from the checkout
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import requests  # noqa: E402
from tqdm import tqdm  # noqa: E402

from client import plot, timeline_plot  # noqa: E402
from client.client import CLIENT_DIR, ShowDefaults, fetch_stats, mean_latency_by_num_tokens, \
    write_run_files  # noqa: E402
from client.interrupts import interrupted, stopping_cleanly_on_signals  # noqa: E402
from client.load import run_load  # noqa: E402
from client.server_process import ServerFailed, running_server  # noqa: E402
from client.workload import DEFAULT_NUM_TOKENS_RANGE, PromptData  # noqa: E402
# telemetry/ is the server's: both sides compute TTFT/TPOT/E2E figures alike
from telemetry.latency import RequestRecord, distribution  # noqa: E402

REPO_DIR = CLIENT_DIR.parent

POLICIES = ("nobatch", "static", "dynamic")
# The original setup, for a GPU; on a CPU a smaller model and sample so all three runs finish in minutes.
GPU_DEFAULTS = {"model": "gpt2-medium", "weights": "auto", "numsamples": 100, "wait": 1.0}
CPU_DEFAULTS = {"model": "gpt2", "weights": "random", "numsamples": 40, "wait": 0.5}
# The original /stats keys, shown first in the report.
ORIGINAL_STATS = ("latency-per-token", "throughput", "total-tokens-handled", "total-elapsed-time")


class ExperimentError(Exception):
    """A run could not be carried out; the message says why (and shows the server's log when it helps)."""


@dataclass
class PolicyRun:
    policy: str
    records: list[RequestRecord]
    stats: dict
    timelines: list[dict] = field(default_factory=list)  # GET /timeline of each engine after the workload


# --- setup ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare nobatch, static and dynamic batching on one workload.",
                                     formatter_class=ShowDefaults)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--model", help="gpt2, gpt2-medium, ... or a local model directory (default: by device)")
    parser.add_argument("--weights", choices=("auto", "pretrained", "random"), help="default: by device")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--numsamples", type=int, help="requests per policy (default: by device)")
    parser.add_argument("--numtokens_range", type=int, nargs="+", default=list(DEFAULT_NUM_TOKENS_RANGE))
    parser.add_argument("--wait", type=float, help="sleep U(0,1) x wait seconds between launches (default: by device)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed, the same for every policy")
    parser.add_argument("--max-batch", type=int,
                        help="the server's MAX_BATCH (default: the server's, 512 on a GPU and 128 on a CPU)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="serve with BATCH_INVARIANT: every request's text must then be the "
                             "same under every policy; slower, so the timings are not the default mode's")
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for /health")
    parser.add_argument("--out", type=Path, default=REPO_DIR / "results")
    return parser.parse_args(argv)


def gpu_available(device: str) -> bool:
    if device != "auto":
        return device == "cuda"
    import torch  # only here: the rest of the client needs no torch

    return torch.cuda.is_available()


def apply_device_defaults(args: argparse.Namespace) -> str:
    """Fill the flags left unset from the GPU or CPU defaults; returns a sentence for the report saying which."""
    on_gpu = gpu_available(args.device)
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    filled = {name: value for name, value in defaults.items() if getattr(args, name) is None}
    for name, value in filled.items():
        setattr(args, name, value)
    if on_gpu or not filled:
        return ""
    chosen = ", ".join(f"{name} {value}" for name, value in filled.items())
    return (f"No GPU, so this run used smaller CPU defaults ({chosen}) to finish in minutes instead of the original "
            f"setup (gpt2-medium, 100 requests, wait 1 s; `--model gpt2-medium --numsamples 100 --wait 1`).")


# --- one server per policy ------------------------------------------------------------------------------------

def server_settings(args: argparse.Namespace) -> dict[str, str]:
    settings = {"MODEL": args.model, "WEIGHTS": args.weights, "DEVICE": args.device,
                # Every request may be in flight at once: the server needs a thread for each, or it caps the batch.
                "THREADS": str(args.numsamples + 4),
                # The server's own token_data_<policy>.csv goes with this run's results, not into the repo's data/.
                "DATA_DIR": str(args.out / "server_data")}
    if args.max_batch:
        settings["MAX_BATCH"] = str(args.max_batch)
    if args.batch_invariant:
        settings["BATCH_INVARIANT"] = "true"
    return settings


def run_policy(policy: str, workload: PromptData, args: argparse.Namespace) -> PolicyRun:
    tqdm.write(f"[{policy}] starting ./server.sh {policy} (model {args.model}, weights {args.weights})")
    log_path = args.out / f"server_{policy}.log"
    try:
        with running_server(policy, server_settings(args), log_path=str(log_path),
                            timeout=args.startup_timeout) as (url, _):
            records = run_load(url, workload.requests, desc=policy).records
            stats = fetch_stats(url)
            timelines = fetch_timelines(url)
    except ServerFailed as e:
        raise ExperimentError(f"{policy}: {e}") from None
    failed = [r for r in records if not r.ok]
    if failed and len(failed) == len(records):  # a broken server: comparing the other policies would waste minutes
        raise ExperimentError(f"every request to {policy} failed, first with {failed[0].error}; "
                              f"the server's log is {log_path}")
    if failed:
        tqdm.write(f"[{policy}] {len(failed)} of {len(records)} requests failed, first: {failed[0].error}")
    return PolicyRun(policy, records, stats, timelines)


def fetch_timelines(url: str) -> list[dict]:
    """Every engine's record, in engine order: engine 0's says how many engines the server has."""
    first = fetch_timeline(url, 0)
    return [first] + [fetch_timeline(url, engine) for engine in range(1, first.get("engines", 1))]


def fetch_timeline(url: str, engine: int) -> dict:
    response = requests.get(f"{url}/timeline", params={"engine": engine}, timeout=60)
    response.raise_for_status()
    return response.json()


# --- figures and raw data -------------------------------------------------------------------------------------

def ok_values(records: list[RequestRecord], metric: str) -> list[float]:
    values = (getattr(r, metric) for r in records if r.ok)
    return [v for v in values if v is not None]


def client_metrics(records: list[RequestRecord]) -> dict[str, float]:
    """Measured by the client, the same way for every policy: wall-clock is first request sent to last response."""
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    duration = max((r.finish for r in ok), default=0.0) - min((r.arrival for r in ok), default=0.0)
    metrics = {"requests": len(records), "failed": len(records) - len(ok), "output-tokens": output_tokens,
               "duration-s": duration, "output-tokens-per-s": output_tokens / duration if duration else 0.0,
               "requests-per-s": len(ok) / duration if duration else 0.0}
    for metric in ("ttft", "tpot", "e2e"):
        for name, value in distribution(ok_values(records, metric)).items():
            metrics[f"{metric}-{name}"] = value
    return metrics


def write_summary_csv(path: Path, metrics: dict[str, dict[str, float]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        columns = list(next(iter(metrics.values())))
        writer.writerow(["policy", *columns])
        for policy, row in metrics.items():
            writer.writerow([policy, *(row[c] for c in columns)])


def figure_caption(server: dict, args: argparse.Namespace) -> str:
    """What every figure shows: model, device, workload."""
    return (f"{server.get('model', args.model)} ({server.get('weights', args.weights)} weights, "
            f"{server.get('dtype', '?')}) on {server.get('device', args.device)}; {args.numsamples} requests "
            f"per policy, num_tokens from {args.numtokens_range}, launched U(0,1) x {args.wait} s apart "
            f"(seed {args.seed})")


def write_figures(runs: list[PolicyRun], metrics: dict[str, dict[str, float]], args: argparse.Namespace,
                  ) -> list[Path]:
    out, caption = args.out, figure_caption(runs[0].stats, args)
    by_policy = {run.policy: run.records for run in runs}
    paths = plot.plot_latency_vs_tokens(
        {p: list(mean_latency_by_num_tokens(records).items()) for p, records in by_policy.items()},
        out / "latency_vs_tokens", caption)
    paths += plot.plot_throughput({p: m["output-tokens-per-s"] for p, m in metrics.items()}, out / "throughput",
                                  caption)
    for metric, name, ylabel, title, log in (
        ("ttft", "ttft", "time to first token (s)", "TTFT per request (server-measured)", True),
        ("tpot", "tpot", "time per output token (s)", "TPOT per request, after the first token (server-measured)",
         False),
        ("e2e", "e2e_latency", "end-to-end latency (s)", "E2E latency per request (client-measured)", True),
    ):
        samples = {p: ok_values(records, metric) for p, records in by_policy.items()}
        paths += plot.plot_distribution(samples, ylabel, title, out / name, caption, log=log)
    paths += timeline_plot.plot_timelines({run.policy: run.timelines for run in runs}, out / "timeline", caption)
    return paths


# --- report ---------------------------------------------------------------------------------------------------

def git_commit() -> str:
    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", *command], cwd=REPO_DIR, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git on this machine
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (no commit, or not a git checkout)"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    description = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch
    except ImportError:
        return description
    if torch.cuda.is_available():
        description += f"; GPU {torch.cuda.get_device_name(0)}"
    return description + f"; torch {torch.__version__}"


def flatten(stats: dict, prefix: str = "") -> dict[str, object]:
    """`{"ttft": {"p50": x}}` -> `{"ttft p50": x}`, so nested /stats figures fit one table row each."""
    flat = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key} "))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


TPOT_NOTE = ("Time per output token rises with batching: every running sequence gets its next token from the same "
             "step, so the more sequences share a step, the longer that step takes, and each of them waits for all "
             "of it. Batching trades a little time per token for far more tokens per second, and far less waiting "
             "to start.")
# Shown once in the report's header rather than as a /stats row per policy.
SERVER_INFO = ("policy", "model", "weights", "device", "dtype", "warning")
HEADLINE = ("output-tokens-per-s", "requests-per-s", "ttft-p50", "ttft-p90", "ttft-p99", "tpot-p50", "tpot-p90",
            "tpot-p99", "e2e-p50", "e2e-p90", "e2e-p99", "output-tokens", "requests", "failed")


def stats_table(runs: list[PolicyRun]) -> str:
    """Every /stats figure as a row, one column per policy; the original keys first."""
    flat = {run.policy: flatten(run.stats) for run in runs}
    present = [k for f in flat.values() for k in f if k not in SERVER_INFO]
    keys = list(dict.fromkeys([k for k in ORIGINAL_STATS if k in present] + present))
    return markdown_table(["/stats", *flat], [[k, *(f.get(k) for f in flat.values())] for k in keys])


def latency_by_tokens_table(runs: list[PolicyRun]) -> str:
    """The original figure as numbers: mean latency per requested token count, one column per policy."""
    means = {run.policy: mean_latency_by_num_tokens(run.records) for run in runs}
    num_tokens = sorted({n for m in means.values() for n in m})
    return markdown_table(["num_tokens", *means], [[n, *(m.get(n) for m in means.values())] for n in num_tokens])


def report_header(server: dict, args: argparse.Namespace, defaults_note: str) -> str:
    lines = [
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Git commit: {git_commit()}.",
        f"Machine: {machine()}.",
        f"Model: {server.get('model', args.model)}; weights: {server.get('weights', args.weights)}; "
        f"device: {server.get('device', args.device)}; dtype: {server.get('dtype', 'not reported')}.",
        f"Workload: {args.numsamples} requests per policy, prompts \"Request {{i}}\", num_tokens drawn from "
        f"{args.numtokens_range} (seed {args.seed}), launches U(0,1) x {args.wait} s apart; every policy got the "
        f"same requests at the same times.",
    ]
    if "warning" in server:
        lines.append(f"Warning from the server: {server['warning']}.")
    if defaults_note:
        lines.append(defaults_note)
    return "\n".join(lines)


def different_texts(runs: list[PolicyRun]) -> tuple[list[int], int]:
    """The requests (by index) whose texts differ between policies, and how many were answered by every policy.
    Every request carries its own sampling seed, so a request gets the same text wherever its logits are the same."""
    answered = [i for i in range(len(runs[0].records)) if all(run.records[i].ok for run in runs)]
    return [i for i in answered if len({run.records[i].completion for run in runs}) > 1], len(answered)


def texts_note(runs: list[PolicyRun], args: argparse.Namespace) -> str:
    """What batching did to the text: nothing, under BATCH_INVARIANT; else how many requests it changed."""
    differ, answered = different_texts(runs)
    if not differ:
        return (f"Every one of the {answered} requests answered by every policy got the same text from each "
                "(each request sends its own sampling seed), so batching changed the time of the answers alone.")
    why = ("under BATCH_INVARIANT, which should never happen: a bug" if args.batch_invariant else
           "without BATCH_INVARIANT: a step's products reduce in an order that depends on its batch, and a seeded "
           "draw that lands within a rounding error of the boundary between two tokens can fall either way "
           "(`--batch-invariant` rules that out, on a CPU)")
    return (f"{len(differ)} of the {answered} requests answered by every policy got different texts "
            f"(requests {', '.join(map(str, differ[:10]))}{', ...' if len(differ) > 10 else ''}), {why}.")


def client_table(metrics: dict[str, dict[str, float]]) -> str:
    """The headline figures, one row per policy (report.md's first table, and what the comparison prints)."""
    rows = [[policy, *(m[k] for k in HEADLINE)] for policy, m in metrics.items()]
    return markdown_table(["policy", *HEADLINE], rows)


def write_report(path: Path, runs: list[PolicyRun], metrics: dict[str, dict[str, float]],
                 args: argparse.Namespace, defaults_note: str) -> None:
    path.write_text(f"""# Batching comparison

{report_header(runs[0].stats, args, defaults_note)}

## Client-measured, one row per policy

Throughput is output tokens over wall-clock time, first request sent to last response. TTFT and TPOT come from
the server's per-request timings; E2E latency is measured by the client. Times in seconds.

{client_table(metrics)}

## The same text?

{texts_note(runs, args)}

## Mean latency (s) by requested tokens (the original figure)

{latency_by_tokens_table(runs)}

## What the scheduler did

![timeline](timeline.png)

Each row is one request in arrival order -- grey while it waits, orange while its prompt is prefilled, blue while it
decodes, a black mark at its finish -- under the requests running (blue) and waiting (grey) at each step, every
panel on one time axis: no batching draws a staircase, static batching convoys, dynamic batching continuous admission.

## Server /stats

`throughput` and `latency-per-token` are the original project's figures: `throughput` is total tokens over the
*sum* of request latencies, not a wall-clock rate; `wall-clock-throughput` is the honest one.

{stats_table(runs)}

## Figures

![latency vs requested tokens](latency_vs_tokens.png)

![throughput](throughput.png)

![TTFT](ttft.png)

Time to first token, on a log scale: a request that waits behind others (nobatch, static) waits for their
whole generation; dynamic batching starts it at the next step.

![TPOT](tpot.png)

{TPOT_NOTE}

![E2E latency](e2e_latency.png)

## Data

- `latency_vs_tokens.png/.pdf` from `token_data_<policy>.csv`;
- `throughput.png/.pdf` from `summary.csv` (every client-measured figure, one row per policy);
- `ttft`, `tpot`, `e2e_latency` `.png/.pdf` from `requests_<policy>.csv` (one row per request);
- `timeline.png/.pdf` from `timeline_<policy>.json` (the server's /timeline after the run, a record per engine);
- `stats_<policy>.json`: the server's /stats after the run; `server_<policy>.log`: its log;
  `server_data/token_data_<policy>.csv`: the server's own mean latency per requested token count.
""")


# --- main -----------------------------------------------------------------------------------------------------

def save_run(out: Path, run: PolicyRun) -> None:
    write_run_files(out, run.policy, run.records)
    (out / f"stats_{run.policy}.json").write_text(json.dumps(run.stats, indent=2) + "\n")
    (out / f"timeline_{run.policy}.json").write_text(json.dumps(run.timelines) + "\n")


def write_results(runs: list[PolicyRun], args: argparse.Namespace, defaults_note: str) -> list[Path]:
    metrics = {run.policy: client_metrics(run.records) for run in runs}
    write_summary_csv(args.out / "summary.csv", metrics)
    paths = write_figures(runs, metrics, args)
    write_report(args.out / "report.md", runs, metrics, args, defaults_note)
    return paths + [args.out / "report.md"]


def run_experiment(args: argparse.Namespace) -> tuple[list[PolicyRun], list[Path]]:
    defaults_note = apply_device_defaults(args)
    args.out.mkdir(parents=True, exist_ok=True)
    workload = PromptData(args.numsamples, args.numtokens_range, "random", args.wait, args.seed, seeded=True)
    runs = []
    for policy in args.policies:
        runs.append(run_policy(policy, workload, args))
        save_run(args.out, runs[-1])  # saved at once: a later policy's failure keeps this one's data
    return runs, write_results(runs, args, defaults_note)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with stopping_cleanly_on_signals():  # the running server's `with` block stops it on the way out
            runs, paths = run_experiment(args)
    except (ExperimentError, requests.RequestException, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return interrupted(e)
    print(client_table({run.policy: client_metrics(run.records) for run in runs}))
    if len(runs) > 1:
        print(texts_note(runs, args))
    print("wrote " + ", ".join(p.name for p in paths) + f" in {args.out}")
    failed = sum(not r.ok for run in runs for r in run.records)
    if failed:
        print(f"error: {failed} requests failed (see report.md and the requests_<policy>.csv files)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
