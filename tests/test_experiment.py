"""The comparison command: its defaults, its report and figures from known runs, a short real comparison, and
how it ends when stopped (its server with it, quietly)."""
import contextlib
import csv
import dataclasses
import glob
import json
import os
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from client import experiment, plot, timeline_plot
from conftest import wait_until
from telemetry.latency import RequestRecord

REPO_DIR = Path(__file__).resolve().parent.parent

POLICIES = ("nobatch", "static", "dynamic")
FIGURES = ("latency_vs_tokens", "throughput", "ttft", "tpot", "e2e_latency", "timeline")


def fake_run(policy: str, slowdown: float) -> experiment.PolicyRun:
    records = [RequestRecord(arrival=0.1 * i, finish=0.1 * i + slowdown * n, first_token=0.1 * i + 0.05 * slowdown,
                             last_token=0.1 * i + slowdown * n - 0.01, prompt_tokens=3, output_tokens=n,
                             requested_tokens=n, prompt=f"Request {i}")
               for i, n in enumerate((1, 25, 100, 25))]
    stats = {"latency-per-token": slowdown, "throughput": 1 / slowdown, "total-tokens-handled": 151,
             "total-elapsed-time": 151 * slowdown, "ttft": {"mean": 0.1, "p50": 0.1, "p90": 0.2, "p99": 0.3},
             "policy": policy, "model": "gpt2", "weights": "random", "device": "cpu", "dtype": "float32"}
    return experiment.PolicyRun(policy, records, stats)


def check_outputs(out: Path, policies=POLICIES) -> str:
    """Every figure, raw file and report row is there, one per policy; returns the report."""
    for figure in FIGURES:
        for suffix in (".png", ".pdf"):
            assert (out / f"{figure}{suffix}").stat().st_size > 0, f"{figure}{suffix}"
    for policy in policies:
        for raw in (f"requests_{policy}.csv", f"token_data_{policy}.csv", f"stats_{policy}.json",
                    f"timeline_{policy}.json"):
            assert (out / raw).stat().st_size > 0, raw
    with open(out / "summary.csv", newline="") as f:
        assert [row["policy"] for row in csv.DictReader(f)] == list(policies)
    report = (out / "report.md").read_text()
    for policy in policies:
        assert sum(line.startswith(f"| {policy} |") for line in report.splitlines()) == 1, policy
    return report


def test_cpu_defaults_fill_only_the_flags_left_unset_and_the_report_says_so():
    args = experiment.parse_args(["--device", "cpu", "--numsamples", "7"])
    note = experiment.apply_device_defaults(args)
    assert (args.model, args.weights, args.numsamples) == ("gpt2", "random", 7)
    assert "No GPU" in note and "gpt2-medium" in note


def test_gpu_defaults_are_the_original_setup():
    args = experiment.parse_args(["--device", "cuda"])
    assert experiment.apply_device_defaults(args) == ""
    assert (args.model, args.numsamples, args.wait) == ("gpt2-medium", 100, 1.0)


def test_nested_stats_become_one_row_each():
    assert experiment.flatten({"ttft": {"p50": 1.0, "p99": 2.0}, "policy": "static"}) == {
        "ttft p50": 1.0, "ttft p99": 2.0, "policy": "static"}


def test_client_metrics_count_only_answered_requests():
    records = fake_run("static", 0.1).records
    records.append(RequestRecord(arrival=0.0, finish=60.0, requested_tokens=100, prompt="Request 9",
                                 error="HTTP 500: boom"))
    metrics = experiment.client_metrics(records)
    assert (metrics["requests"], metrics["failed"], metrics["output-tokens"]) == (5, 1, 151)
    # From the first start (0.0) to the last answered finish (request 2: 0.2 + 0.1 x 100), not the failed one's 60.
    assert metrics["duration-s"] == pytest.approx(10.2)


def test_report_figures_and_raw_data_from_known_runs(tmp_path):
    runs = [fake_run(policy, slowdown) for policy, slowdown in zip(POLICIES, (0.3, 0.2, 0.1))]
    args = experiment.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    note = experiment.apply_device_defaults(args)
    for run in runs:
        experiment.save_run(tmp_path, run)
    experiment.write_results(runs, args, note)
    report = check_outputs(tmp_path)
    assert "| latency-per-token | 0.3 | 0.2 | 0.1 |" in report
    assert "| ttft p99 | 0.3 | 0.3 | 0.3 |" in report
    assert note in report


def test_every_figure_says_which_model_device_and_workload_it_shows(tmp_path, monkeypatch):
    captions, save = {}, plot.save_figure

    def save_and_note_caption(fig, stem: Path, caption: str = "") -> list[Path]:
        captions[stem.name] = caption
        return save(fig, stem, caption)

    monkeypatch.setattr(plot, "save_figure", save_and_note_caption)
    args = experiment.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    experiment.apply_device_defaults(args)
    runs = [fake_run(policy, slowdown) for policy, slowdown in zip(POLICIES, (0.3, 0.2, 0.1))]
    experiment.write_figures(runs, {p: experiment.client_metrics(r.records) for p, r in zip(POLICIES, runs)}, args)
    assert set(captions) == set(FIGURES)
    for caption in captions.values():
        assert "gpt2 (random weights, float32) on cpu" in caption and "40 requests per policy" in caption


def test_ttft_is_drawn_on_a_log_axis_with_each_median_written():
    fig = plot.draw_distribution({"nobatch": [10.0, 70.0], "dynamic": [0.1, 0.2]}, "TTFT (s)", "TTFT", log=True)
    [ax] = fig.axes
    assert ax.get_yscale() == "log"
    assert {t.get_text() for t in ax.texts} == {"median 40 s", "median 0.15 s"}


def test_the_report_says_why_tpot_rises_with_batching(tmp_path):
    runs = [fake_run(policy, slowdown) for policy, slowdown in zip(POLICIES, (0.3, 0.2, 0.1))]
    args = experiment.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    experiment.write_report(tmp_path / "report.md", runs, {p: experiment.client_metrics(r.records)
                                                           for p, r in zip(POLICIES, runs)}, args, "")
    report = (tmp_path / "report.md").read_text()
    assert "![TPOT](tpot.png)\n\nTime per output token rises with batching" in report


def engine_record(origin_unix: float, arrival: float) -> dict:
    """An engine's /timeline of one request, waiting 0.1 s, then decoding for a second."""
    admitted, finish = arrival + 0.1, arrival + 1.1
    request = {"id": 0, "arrival": arrival, "phases": [[arrival, "waiting"], [admitted, "prefill"],
                                                       [admitted, "decoding"], [finish, "finished"]]}
    steps = [{"start": admitted, "duration": 1.0, "running": 1, "waiting": 0}]
    return {"origin_unix": origin_unix, "now": finish, "steps": steps, "requests": [request]}


def test_the_timeline_figure_draws_a_lane_per_engine_on_one_clock_and_reads_single_records(tmp_path):
    timelines = {"nobatch": engine_record(100.0, 1.0),  # as older runs saved it
                 "dynamic": [engine_record(100.0, 1.0), engine_record(102.0, 0.5)]}
    lanes = timeline_plot.lanes_of(timelines)
    assert [(lane.policy, lane.engine) for lane in lanes] == [("nobatch", 0), ("dynamic", 0), ("dynamic", 1)]
    # engine 1 started 2 s after engine 0: its request, at 0.5 s on its clock, came 1.5 s after the first one
    assert [lane.zero for lane in lanes] == [1.0, 1.0, -1.0]
    assert all(path.stat().st_size > 0 for path in timeline_plot.plot_timelines(timelines, tmp_path / "timeline"))


def cache_hit_record() -> dict:
    """engine_record's request, admitted with 32 of its 40 prompt tokens in the prefix cache: its step computed 8."""
    record = engine_record(100.0, 1.0)
    record["requests"][0] |= {"admitted": 1.1, "prompt_tokens": 40, "cached_tokens": 32}
    record["steps"][0] |= {"prefill_tokens": 8, "cached_tokens": 32}
    return record


def test_the_timeline_figure_marks_prefix_cache_hits_and_the_cached_share_and_reads_older_records(tmp_path):
    timelines = {"nobatch": engine_record(100.0, 1.0),  # as runs before prefix caching saved it: no cached_tokens
                 "dynamic": cache_hit_record()}
    fig = timeline_plot.timeline_figure(timelines)
    [hits] = fig.findobj(lambda artist: artist.get_gid() == timeline_plot.CACHE_HITS)  # dynamic's rows only
    assert hits.get_offsets().tolist() == [[pytest.approx(0.1), 0]]  # at its admission, on its row
    notes = [ax.get_title(loc="right") for ax in fig.axes]  # nobatch's counts and rows, then dynamic's
    assert notes == ["", "", "80% of prompt tokens from the prefix cache", ""]
    assert "prefix-cache hit (admitted with cached tokens)" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert all(path.stat().st_size > 0 for path in plot.save_figure(fig, tmp_path / "timeline"))

    older = timeline_plot.timeline_figure({"nobatch": engine_record(100.0, 1.0)})
    assert not older.findobj(lambda artist: artist.get_gid() == timeline_plot.CACHE_HITS)
    assert not any("prefix" in t.get_text() for t in older.legends[0].get_texts())
    assert all(path.stat().st_size > 0 for path in plot.save_figure(older, tmp_path / "older"))


def test_short_comparison_of_all_three_policies_on_a_real_server(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KV_CACHE_GB", "0.2")  # the tiny model needs no 2 GB cache
    exit_code = experiment.main(["--model", tiny_model_dir, "--weights", "pretrained", "--device", "cpu",
                                 "--numsamples", "5", "--wait", "0.1", "--numtokens_range", "1", "5", "20",
                                 "--out", str(tmp_path)])
    assert exit_code == 0
    printed = capsys.readouterr().out  # the figures, not only where they went
    assert "| policy | output-tokens-per-s |" in printed and all(f"| {p} |" in printed for p in POLICIES)
    report = check_outputs(tmp_path)
    assert "weights: pretrained; device: cpu; dtype: float32" in report
    for policy in POLICIES:
        stats = json.loads((tmp_path / f"stats_{policy}.json").read_text())
        assert stats["policy"] == policy and stats["requests-finished"] == 5
        [timeline] = json.loads((tmp_path / f"timeline_{policy}.json").read_text())  # a record per engine
        assert [r["finish_reason"] for r in timeline["requests"]] == ["length"] * 5
        with open(tmp_path / f"requests_{policy}.csv", newline="") as f:
            assert [row["error"] for row in csv.DictReader(f)] == [""] * 5


def test_the_report_says_which_requests_got_different_texts(tmp_path):
    runs = [fake_run(policy, 0.1) for policy in POLICIES]
    args = experiment.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    for run, text in zip(runs, ("a", "a", "b")):
        run.records[2] = dataclasses.replace(run.records[2], completion=text)
    assert experiment.different_texts(runs) == ([2], 4)
    assert "1 of the 4 requests answered by every policy got different texts (requests 2)" in \
        experiment.texts_note(runs, args)
    for run in runs:
        run.records[2] = dataclasses.replace(run.records[2], completion="a")
    assert "Every one of the 4 requests" in experiment.texts_note(runs, args)


def test_a_batch_invariant_comparison_gives_every_seeded_request_one_text(tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("KV_CACHE_GB", "0.2")
    exit_code = experiment.main(["--model", tiny_model_dir, "--weights", "pretrained", "--device", "cpu",
                                 "--numsamples", "6", "--wait", "0.05", "--numtokens_range", "5", "20",
                                 "--policies", "nobatch", "dynamic", "--batch-invariant", "--out", str(tmp_path)])
    assert exit_code == 0
    assert "Every one of the 6 requests answered by every policy got the same text" in capsys.readouterr().out
    assert json.loads((tmp_path / "stats_dynamic.json").read_text())["batch-invariant"] is True


def test_a_policy_whose_every_request_fails_stops_the_comparison_with_the_reason(tiny_model_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    monkeypatch.setenv("KV_CACHE_GB", "0.2")
    exit_code = experiment.main(["--model", tiny_model_dir, "--weights", "pretrained", "--device", "cpu",
                                 "--policies", "nobatch", "dynamic", "--numsamples", "2", "--wait", "0",
                                 "--numtokens_range", "5000", "--out", str(tmp_path)])  # past GPT-2's context
    assert exit_code == 1
    err = capsys.readouterr().err
    assert "every request to nobatch failed" in err and "HTTP 400" in err
    assert not (tmp_path / "server_dynamic.log").exists()  # it did not go on to the next policy


# ---- stopped: its server goes with it ----

def descendants(pid: int) -> set[int]:
    children = defaultdict(set)
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children[parent].add(int(stat.split("/")[2]))
    found, todo = set(), [pid]
    while todo:
        found |= children[todo[-1]]
        todo = todo[:-1] + list(children[todo[-1]])
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_comparison_stopped_by_sigterm_stops_its_server_quietly(tiny_model_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(REPO_DIR / "client" / "experiment.py"), "--model", tiny_model_dir, "--weights",
         "pretrained", "--device", "cpu", "--policies", "dynamic", "--numsamples", "100", "--wait", "1",
         "--out", str(tmp_path)], env={**os.environ, "KV_CACHE_GB": "0.2"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    server = set()
    try:
        log = tmp_path / "server_dynamic.log"
        wait_until(lambda: log.exists() and "serving" in log.read_text(), timeout=120)
        server = descendants(proc.pid)
        assert server  # server.sh's gunicorn and its worker
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in server), timeout=60)
    finally:
        for pid in server | descendants(proc.pid):  # what a failed run would leave
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err and "stopped (SIGTERM)" in err


def test_ctrl_c_ends_the_client_in_one_line(tmp_path):
    with socket.socket() as silent:  # a server that accepts and never answers: the client waits on it
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        # Ctrl-C as a terminal delivers it: a job that a shell started in the background (CI run that way)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
        proc = subprocess.Popen([sys.executable, str(REPO_DIR / "client" / "client.py"), "--port",
                                 str(silent.getsockname()[1]), "--out", str(tmp_path)],
                                env={"IP": "127.0.0.1", "KEY": ""}, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        connection, _ = silent.accept()
        with connection:
            connection.settimeout(60)
            assert connection.recv(64).startswith(b"GET /health")  # sent: it waits for the answer now
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert err.strip() == "stopped (SIGINT)"


@pytest.mark.skipif(sys.platform != "linux", reason="prctl")
def test_a_server_process_dies_with_the_process_that_started_it_even_by_sigkill():
    """server_process starts servers with _terminate_when_parent_dies: a stand-in 'server' (sleep), started the
    same way by a process that is then SIGKILLed, goes with it."""
    starter = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; sys.path.insert(0, sys.argv[1]); from client import server_process; "
        "p = subprocess.Popen(['sleep', '600'], preexec_fn=server_process._terminate_when_parent_dies); "
        "print(p.pid, flush=True); time.sleep(600)"), str(REPO_DIR)], stdout=subprocess.PIPE, text=True)
    server = int(starter.stdout.readline())
    starter.kill()
    starter.wait()
    wait_until(lambda: gone(server))


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # dead, not yet reaped
    except FileNotFoundError:
        return True
