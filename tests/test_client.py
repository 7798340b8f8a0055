"""The client: its seeded workload, the files it writes, the plot, and a run against a real server."""
import csv
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path

import pytest
import requests

from client import client, interrupts, plot
from client.load import run_load
from client.workload import PromptData, Request
from conftest import json_server, running_server
from telemetry.latency import RequestRecord

REPO_DIR = Path(__file__).resolve().parent.parent
CLIENT_DIR = REPO_DIR / "client"


def record(rid: int, num_tokens: int, latency: float, ttft: float | None = None,
           server_latency: float | None = None, **kwargs) -> RequestRecord:
    """Request `rid`, sent at `rid` s, answered `latency` s later; ttft and server_latency are the server's."""
    return RequestRecord(arrival=float(rid), finish=rid + latency, first_token=None if ttft is None else rid + ttft,
                         last_token=None if server_latency is None else rid + server_latency,
                         requested_tokens=num_tokens, prompt=f"Request {rid}", **kwargs)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- workload -------------------------------------------------------------------------------------------------

def test_same_seed_gives_the_same_workload():
    assert PromptData(50, [1, 25, 100], seed=3).requests == PromptData(50, [1, 25, 100], seed=3).requests


def test_another_seed_gives_another_workload():
    assert PromptData(50, [1, 25, 100], seed=0).requests != PromptData(50, [1, 25, 100], seed=1).requests


def test_prompts_are_numbered_requests_asking_for_one_of_the_choices():
    samples = PromptData(40, [1, 25, 100]).requests
    assert [s.prompt for s in samples] == [f"Request {i}" for i in range(40)]
    assert {s.num_tokens for s in samples} == {1, 25, 100}


def test_descend_sends_the_same_draws_longest_first():
    drawn = PromptData(40, [1, 25, 100], "random").requests
    descending = PromptData(40, [1, 25, 100], "descend").requests
    assert [s.num_tokens for s in descending] == sorted((s.num_tokens for s in drawn), reverse=True)
    assert sorted(s.prompt for s in descending) == sorted(s.prompt for s in drawn)
    assert [s.arrival for s in descending] == [s.arrival for s in drawn]


def test_launches_start_at_once_and_are_at_most_wait_apart():
    offsets = [s.arrival for s in PromptData(30, wait=0.5).requests]
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0
    assert all(0.0 <= gap <= 0.5 for gap in gaps)


def test_wait_changes_when_requests_launch_but_not_which():
    fast, slow = PromptData(30, wait=0.1).requests, PromptData(30, wait=2.0).requests
    assert [(s.prompt, s.num_tokens) for s in fast] == [(s.prompt, s.num_tokens) for s in slow]


@pytest.mark.parametrize("kwargs", [{"selection": "shortest"}, {"num_tokens_range": []},
                                    {"num_tokens_range": [0, 5]}, {"wait": -1.0}])
def test_invalid_workload_is_refused(kwargs):
    with pytest.raises(ValueError):
        PromptData(5, **kwargs)


# --- results files --------------------------------------------------------------------------------------------

def test_tpot_is_decode_time_per_token_after_the_first():
    assert record(0, 5, 1.2, ttft=0.2, server_latency=1.0, output_tokens=5).tpot == pytest.approx(0.2)
    assert record(0, 1, 0.3, ttft=0.2, server_latency=0.2, output_tokens=1).tpot is None
    assert record(0, 5, 0.3, error="HTTP 503: overloaded").tpot is None


def test_latency_csv_holds_the_mean_latency_of_answered_requests_per_num_tokens(tmp_path):
    records = [record(0, 25, 1.0), record(1, 1, 0.5), record(2, 25, 3.0), record(3, 25, 9.0, error="HTTP 500: boom")]
    client.write_latency_csv(tmp_path / "token_data_dynamic.csv", records)
    assert read_rows(tmp_path / "token_data_dynamic.csv") == [{"num_tokens": "1", "latency": "0.5"},
                                                              {"num_tokens": "25", "latency": "2.0"}]


def test_records_csv_has_one_row_per_request_with_its_timings(tmp_path):
    records = [record(0, 5, 1.2, ttft=0.2, server_latency=1.0, output_tokens=5, completion="Request 0 ..."),
               record(1, 25, 0.1, error="HTTP 500: boom")]
    client.write_run_files(tmp_path, "static", records)
    rows = read_rows(tmp_path / "requests_static.csv")
    assert list(rows[0]) == ["rid", "prompt", "num_tokens", "start", "finish", "latency", "ttft", "server_latency",
                             "prompt_tokens", "completion_tokens", "error", "tpot"]  # the original's columns
    assert [row["rid"] for row in rows] == ["0", "1"]
    timings = [[float(row[column]) for column in ("start", "finish", "latency")] for row in rows]
    assert timings == [pytest.approx([0.0, 1.2, 1.2]), pytest.approx([1.0, 1.1, 0.1])]  # since the first send
    assert (float(rows[0]["ttft"]), float(rows[0]["server_latency"])) == pytest.approx((0.2, 1.0))
    assert float(rows[0]["tpot"]) == pytest.approx(0.2)
    assert rows[0]["completion_tokens"] == "5" and rows[1]["completion_tokens"] == ""
    assert rows[1]["error"] == "HTTP 500: boom"
    assert (tmp_path / "token_data_static.csv").exists()


# --- sending ------------------------------------------------------------------------------------------------

def original_server(headers, body: dict) -> tuple[int, dict]:
    """/inference answering as the server does, behind the key "secret"; it refuses any field but the original
    client's two."""
    if headers.get("Authorization") != "Bearer secret":
        return 401, {"error": {"message": "invalid API key"}}
    if set(body) != {"prompt", "num_tokens"}:
        return 400, {"error": {"message": f"unexpected fields {sorted(body)}"}}
    return 200, {"completion": body["prompt"] + " ...", "prompt_tokens": 2, "ttft": 0.25,
                 "completion_tokens": body["num_tokens"], "latency": 1.25}


def test_plain_answers_keep_the_servers_timings_and_refusals_their_message():
    workload = [Request("Request 0", 5), Request("Request 1", 3, arrival=0.2)]
    finished = []
    with json_server(original_server) as url:
        answered = run_load(url, workload, key="secret", progress=False,
                            on_finish=lambda rid, record: finished.append(rid)).records
        [refused] = run_load(url, workload[:1], progress=False).records
    assert finished == [0, 1] and not any(record.error for record in answered)
    first, second = answered
    assert (first.prompt, first.completion) == ("Request 0", "Request 0 ...")
    assert (first.prompt_tokens, first.requested_tokens, first.output_tokens) == (2, 5, 5)
    assert first.ttft == pytest.approx(0.25) and first.tpot == pytest.approx((1.25 - 0.25) / 4)  # the server's
    assert second.arrival - first.arrival == pytest.approx(0.2, abs=0.1)  # sent at its offset
    assert refused.error == "HTTP 401: invalid API key" and refused.ttft is None


# --- plot -----------------------------------------------------------------------------------------------------

def test_plot_draws_every_policy_csv_into_one_png_and_pdf(tmp_path):
    for policy, slope in (("nobatch", 0.3), ("static", 0.2), ("dynamic", 0.1)):
        client.write_latency_csv(tmp_path / f"token_data_{policy}.csv",
                                 [record(i, n, slope * n) for i, n in enumerate((1, 25, 100))])
    assert plot.main([str(tmp_path)]) == 0
    for suffix in (".png", ".pdf"):
        assert (tmp_path / f"latency_vs_tokens{suffix}").stat().st_size > 0
    assert set(plot.latency_csvs([tmp_path])) == {"nobatch", "static", "dynamic"}


def test_an_interrupt_inside_a_requests_task_ends_the_load_without_a_second_traceback(caplog):
    """A KeyboardInterrupt raised in one request's task ends run_load for the caller to report; asyncio then holds
    that task's exception unretrieved, which it would log as "Task exception was never retrieved" with a traceback
    when the task is collected."""
    def interrupt(*_):
        raise KeyboardInterrupt

    with json_server(original_server) as url, pytest.raises(KeyboardInterrupt):
        run_load(url, [Request("Request 0", 5), Request("Request 1", 3, arrival=0.5)], progress=False,
                 on_finish=interrupt)
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_a_sigterm_inside_the_loop_cancels_the_load_and_is_raised_once_the_loop_has_closed(caplog):
    """Here the signal lands in on_finish, asyncio's code around it: raised there, it would end the load from
    whichever frame it hit (asyncio's teardown among them, which then leaves the loop unclosed)."""
    finished = []

    def signal_self(i, record):
        finished.append(i)
        os.kill(os.getpid(), signal.SIGTERM)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with json_server(original_server) as url, interrupts.stopping_cleanly_on_signals(), \
                pytest.raises(interrupts.Interrupted) as stopped:
            run_load(url, [Request("Request 0", 5), Request("Request 1", 3, arrival=1.0)], progress=False,
                     on_finish=signal_self)
        gc.collect()
    assert stopped.value.signum == signal.SIGTERM
    raised_at = traceback.extract_tb(stopped.value.__traceback__)[-1]
    assert (Path(raised_at.filename).name, raised_at.name) == ("interrupts.py", "run")  # not where it landed
    assert finished == [0]  # request 1 was cancelled before it was sent
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]  # nothing left open
    assert "never retrieved" not in caplog.text


def test_a_sigterm_wakes_a_load_waiting_on_a_silent_server_which_then_sees_the_connection_closed():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        seen = []

        def answer_nothing_then_signal():
            connection, _ = silent.accept()
            with connection:
                connection.settimeout(30)
                seen.append(connection.recv(4096))
                os.kill(os.getpid(), signal.SIGTERM)
                seen.append(connection.recv(4096))  # b"": closed by the load's own `finally`

        thread = threading.Thread(target=answer_nothing_then_signal)
        thread.start()
        with interrupts.stopping_cleanly_on_signals(), pytest.raises(interrupts.Interrupted):
            run_load(f"http://127.0.0.1:{silent.getsockname()[1]}", [Request("Request 0", 5)], progress=False)
        thread.join(30)
    assert seen[0].startswith(b"POST /inference") and seen[1] == b""


def test_plot_without_csvs_says_so(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 1
    assert "no token_data_<policy>.csv" in capsys.readouterr().err


# --- against a server -----------------------------------------------------------------------------------------

def run_client(port: int, *args: str) -> subprocess.CompletedProcess:
    """client/client.py as a user runs it; IP from the environment, nothing from a developer's client/.env."""
    return subprocess.run([sys.executable, str(CLIENT_DIR / "client.py"), "--port", str(port), *args],
                          capture_output=True, text=True, env={"IP": "127.0.0.1", "KEY": ""}, timeout=120)


def test_unreachable_server_gives_a_message_not_a_traceback(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_client(port, "--numsamples", "2", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "cannot reach the server" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_request_is_answered_and_stats_are_printed_and_written(tiny_model_dir, tmp_path):
    with running_server("dynamic", tiny_model_dir, DATA_DIR=tmp_path / "server_data") as url:
        for _ in range(3):  # someone else's requests, before the run
            requests.post(url + "/inference", json={"prompt": "earlier", "num_tokens": 2}, timeout=60)
        port = int(url.rsplit(":", 1)[1])
        result = run_client(port, "--numsamples", "6", "--wait", "0.1", "--numtokens_range", "1", "5",
                            "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "6 of 6 requests answered" in result.stdout
    assert all(f"Request {i}" in result.stdout for i in range(6))  # each completion echoes its prompt
    blocks = [b.strip() for b in result.stdout.split("=" * 50) if b.strip().startswith("Request ")]
    progress = [b.splitlines()[0].split("(")[1].split(" answered")[0] for b in blocks]
    assert sorted(progress) == sorted(f"{k}/6" for k in range(1, 7))  # whole blocks, each with its count
    assert "%|" not in result.stdout + result.stderr  # and no progress bar between them
    stats = json.loads((tmp_path / "stats.txt").read_text())
    assert stats["requests-finished"] == 6 and stats["policy"] == "dynamic"  # this run's, not the server's 9
    assert "END STATS" in result.stdout and '"requests-finished": 6' in result.stdout
    rows = read_rows(tmp_path / "requests_dynamic.csv")
    assert len(rows) == 6 and not any(row["error"] for row in rows)
    assert {row["num_tokens"] for row in rows} == {row["completion_tokens"] for row in rows} == {"1", "5"}
    assert {row["num_tokens"] for row in read_rows(tmp_path / "token_data_dynamic.csv")} == {"1", "5"}


def test_help_shows_every_default_and_what_each_flag_is():
    result = subprocess.run([sys.executable, str(CLIENT_DIR / "client.py"), "--help"], capture_output=True,
                            text=True, env={"KEY": "not-to-be-shown"}, timeout=60)
    assert "number of requests to make (default: 100)" in result.stdout
    assert "the server's port" in result.stdout and "(default: 8500)" in result.stdout
    assert "not-to-be-shown" not in result.stdout


def test_single_inference_sends_the_api_key(tiny_model_dir, tmp_path):
    with running_server("nobatch", tiny_model_dir, key="secret", DATA_DIR=tmp_path) as url:
        port = int(url.rsplit(":", 1)[1])
        with_key = run_client(port, "--prompt", "Hello", "--numtokens", "3", "--key", "secret")
        without_key = run_client(port, "--prompt", "Hello", "--numtokens", "3")
    assert with_key.returncode == 0, with_key.stderr
    assert "Prompt 'Hello': 3 tokens in" in with_key.stdout and "Request 0" not in with_key.stdout
    assert without_key.returncode == 1
    assert "refused the API key" in without_key.stderr and "Traceback" not in without_key.stderr
