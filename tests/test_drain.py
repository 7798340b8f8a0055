"""Stopping a real server: SIGTERM drains. /health and new requests get 503 "draining" at once, the requests in
flight go on for GRACEFUL_TIMEOUT_S, and those still running then end with an error (a 503, or an SSE error event
and [DONE]), never a cut connection; then the server exits by itself and takes its engine with it.

Requests are kept in flight for as long as a test needs, on any machine, by a blocker: a request of 128 sequences
of 1000 tokens on a server that runs two sequences at a time, which the test ends by closing its connection (the
server then aborts it). Whatever was queued behind it is still waiting when the test sends SIGTERM."""
import concurrent.futures
import contextlib
import glob
import json
import os
import signal
from collections.abc import Iterator

import pytest
import requests

from client import server_process
from conftest import open_request, wait_until

TIMEOUT = 120  # for any one answer: generous, so that a slow machine fails no test and nothing hangs
LONG = {"prompt": "Tell me everything", "max_tokens": 1000, "n": 128, "ignore_eos": True}  # 128,000 tokens


@contextlib.contextmanager
def server(model_dir: str, log_path: str, **env) -> Iterator[str]:
    """A one-worker dynamic server of the tiny model, as conftest's, with its log where the test can read it."""
    settings = {"MODEL": model_dir, "WEIGHTS": "pretrained", "DEVICE": "cpu", "THREADS": "64", "KV_CACHE_GB": "0.2",
                "WORKERS": "1", "MAX_BATCH": "2", **env}
    with server_process.running_server("dynamic", settings, log_path=log_path, timeout=90) as (url, _):
        yield url


def health(url: str) -> requests.Response:
    return requests.get(url + "/health", timeout=TIMEOUT)


def waiting(url: str) -> int:
    return requests.get(url + "/stats", timeout=TIMEOUT).json()["waiting"]


def master_of(worker_pid: int) -> int:
    """The gunicorn master: server.sh, which execs it, was started in a session of its own, which it leads."""
    master = os.getpgid(worker_pid)
    assert master != os.getpgrp()
    return master


def process_state(pid: int) -> str | None:
    """The process's state (R, S, Z for one that exited and waits for its parent, ...); None once reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def exited(pid: int) -> bool:
    return process_state(pid) in (None, "Z")


def left_behind(master: int) -> list[int]:
    """The processes of the server's group (the master leads it; the workers and the engine are in it) that still
    run."""
    running = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            with open(stat) as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
            if int(group) == master and state != "Z":
                running.append(int(stat.split("/")[2]))
    return running


def exit_status(pid: int) -> int:
    """The exit status of a process that exited and is not reaped yet (the master: this process is its parent)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[49]) >> 8


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=TIMEOUT)


def stream(url: str, path: str, body: dict) -> list[dict | str]:
    """A stream's events, read to its end: JSON objects, then "[DONE]"."""
    with requests.post(url + path, json={**body, "stream": True}, stream=True, timeout=TIMEOUT) as resp:
        assert resp.status_code == 200
        frames = resp.content.decode().split("\n\n")
    assert frames[-1] == ""
    return [json.loads(f.removeprefix("data: ")) if f != "data: [DONE]" else "[DONE]" for f in frames[:-1]]


def assert_refused_while_draining(resp: requests.Response) -> None:
    assert resp.status_code == 503 and resp.headers["Retry-After"] and resp.headers["Connection"] == "close"
    assert resp.json()["error"]["code"] == "draining"


def assert_ended_by_the_drain(error: dict) -> None:
    assert error["code"] == "shutting_down" and "shutting down" in error["message"]


def queue_behind(url: str, pool: concurrent.futures.Executor, expected_waiting: int, fn, *args):
    """Submit fn(*args) and wait until its sequences are queued, so that the queue keeps the submission order."""
    future = pool.submit(fn, *args)
    wait_until(lambda: waiting(url) == expected_waiting, timeout=TIMEOUT)
    return future


def test_sigterm_drains_then_ends_what_still_runs_and_the_server_exits(tiny_model_dir, tmp_path):
    log = tmp_path / "server.log"
    with server(tiny_model_dir, str(log), GRACEFUL_TIMEOUT_S=10) as url, \
            concurrent.futures.ThreadPoolExecutor() as pool:
        first = health(url).json()
        kept_alive = requests.Session()
        assert kept_alive.get(url + "/health", timeout=TIMEOUT).status_code == 200  # its connection stays open

        blocker = open_request(url, "/v1/completions", LONG)
        wait_until(lambda: waiting(url) == 126, timeout=TIMEOUT)  # two of its sequences run
        short = queue_behind(url, pool, 127, post, url, "/inference", {"prompt": "short", "num_tokens": 20})
        long_stream = queue_behind(url, pool, 255, stream, url, "/v1/completions", LONG)
        long_plain = queue_behind(url, pool, 383, post, url, "/v1/completions", LONG)
        long_inference = queue_behind(url, pool, 384, post, url, "/inference", {"prompt": "x", "num_tokens": 1000})
        inference_stream = queue_behind(url, pool, 385, stream, url, "/inference", {"prompt": "x", "num_tokens": 1000})

        master = master_of(first["pid"])
        assert {master, first["pid"]} < set(left_behind(master))  # and the engine
        os.kill(master, signal.SIGTERM)  # the master forwards it to its worker
        wait_until(lambda: health(url).status_code == 503, timeout=TIMEOUT)
        assert health(url).json()["error"]["code"] == "draining"
        assert_refused_while_draining(post(url, "/inference", {"prompt": "new", "num_tokens": 3}))
        assert_refused_while_draining(post(url, "/v1/completions", {"prompt": "new", "max_tokens": 3}))
        assert_refused_while_draining(kept_alive.post(url + "/inference", json={"prompt": "new", "num_tokens": 3},
                                                      timeout=TIMEOUT))

        blocker.close()  # the short request runs now, during the drain, and completes
        done = short.result(timeout=TIMEOUT)
        assert done.status_code == 200 and done.json()["completion_tokens"] == 20
        assert done.headers["Connection"] == "close"  # answered during the drain: the client goes elsewhere next

        *chunks, error, end = long_stream.result(timeout=TIMEOUT)  # it ran beside the short one, then was ended
        assert chunks and all("choices" in c for c in chunks) and end == "[DONE]"
        assert_ended_by_the_drain(error["error"])
        *_, error, end = inference_stream.result(timeout=TIMEOUT)  # never left the queue
        assert end == "[DONE]"
        assert_ended_by_the_drain(error["error"])
        for plain in (long_plain.result(timeout=TIMEOUT), long_inference.result(timeout=TIMEOUT)):
            assert plain.status_code == 503 and plain.headers["Connection"] == "close"
            assert_ended_by_the_drain(plain.json()["error"])

        wait_until(lambda: exited(master), timeout=TIMEOUT)
        assert exit_status(master) == 0 and left_behind(master) == []  # the workers and the engine too
    text = log.read_text()
    assert "Worker exiting" in text and "SIGKILL" not in text  # the worker ended its requests, then itself


def test_a_worker_sent_sigterm_drains_and_gunicorn_replaces_it(tiny_model_dir, tmp_path):
    with server(tiny_model_dir, str(tmp_path / "server.log"), GRACEFUL_TIMEOUT_S=10) as url, \
            concurrent.futures.ThreadPoolExecutor() as pool:
        first = health(url).json()
        blocker = open_request(url, "/v1/completions", LONG)
        wait_until(lambda: waiting(url) == 126, timeout=TIMEOUT)
        short = queue_behind(url, pool, 127, post, url, "/inference", {"prompt": "short", "num_tokens": 20})

        os.kill(first["pid"], signal.SIGTERM)
        wait_until(lambda: health(url).status_code == 503, timeout=TIMEOUT)
        blocker.close()
        done = short.result(timeout=TIMEOUT)
        assert done.status_code == 200 and done.json()["completion_tokens"] == 20

        wait_until(lambda: health(url).status_code == 200, timeout=TIMEOUT)
        assert health(url).json()["pid"] != first["pid"] and exited(first["pid"])
        assert post(url, "/inference", {"prompt": "still there?", "num_tokens": 3}).status_code == 200
        assert not exited(master_of(health(url).json()["pid"]))


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGQUIT], ids=["sigterm", "sigquit"])
def test_a_second_signal_stops_at_once(tiny_model_dir, tmp_path, second):
    """A drain of ten minutes, cut short: the server is gone long before it would have ended."""
    with server(tiny_model_dir, str(tmp_path / "server.log"), GRACEFUL_TIMEOUT_S=600) as url:
        first = health(url).json()
        blocker = open_request(url, "/v1/completions", LONG)
        wait_until(lambda: waiting(url) == 126, timeout=TIMEOUT)
        master = master_of(first["pid"])
        os.kill(master, signal.SIGTERM)
        wait_until(lambda: health(url).status_code == 503, timeout=TIMEOUT)
        os.kill(master, second)
        wait_until(lambda: exited(master), timeout=TIMEOUT)
        assert left_behind(master) == []
        blocker.close()
