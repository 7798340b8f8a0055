"""Engines that start, die or stall on a real server (as the kernel's out-of-memory killer or a driver fault would):
the master starts a new one, the workers reconnect by themselves, with two engines the other never stops serving,
and a stalled engine's silence is a 503. And a server reloaded with SIGHUP still cleans up after itself."""
import concurrent.futures
import contextlib
import glob
import os
import signal
import tempfile
import time

import requests

from client import server_process
from conftest import running_server, wait_until


def health(url: str) -> requests.Response:
    return requests.get(url + "/health", timeout=60)


def serving(url: str) -> dict:
    """/health's answer from a worker that serves (its pid, its engines' pids); {} from one that does not."""
    r = health(url)
    return r.json() if r.status_code == 200 else {}


def engine_pids(url: str) -> list[int]:
    return serving(url).get("engine-pids", [])


def generate(url: str, num_tokens: int) -> requests.Response:
    return requests.post(url + "/inference", json={"prompt": "hi", "num_tokens": num_tokens}, timeout=120)


def test_a_lone_engine_that_dies_fails_its_requests_and_a_new_one_serves_the_same_workers(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, WORKERS=2) as url, \
            concurrent.futures.ThreadPoolExecutor() as pool:
        first = health(url).json()
        long = pool.submit(generate, url, 1000)
        wait_until(lambda: requests.get(url + "/stats", timeout=10).json()["running"] == 1)
        os.kill(first["engine-pids"][0], signal.SIGKILL)
        died = long.result()  # no other engine to resubmit it to
        assert died.status_code == 500 and "engine 0 died" in died.json()["error"]["message"]
        wait_until(lambda: engine_pids(url) not in ([], first["engine-pids"]), timeout=60)
        assert generate(url, 3).json()["completion_tokens"] == 3
        # the workers stayed (a restarted one would have a new pid) and reconnected; which worker takes a
        # connection is the kernel's choice, so ask until the first one answers
        wait_until(lambda: serving(url).get("pid") == first["pid"], timeout=60)


def test_with_two_engines_a_dying_one_loses_no_request(tiny_model_dir):
    """Plain requests have sent nothing to their clients when their engine dies: they run again on the other."""
    with running_server("dynamic", tiny_model_dir, ENGINES=2) as url, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = health(url).json()
        assert first["engines"] == 2 and len(set(first["engine-pids"])) == 2
        answers = [pool.submit(generate, url, 300) for _ in range(8)]
        wait_until(lambda: requests.get(url + "/stats", timeout=10).json()["running"] >= 6)
        os.kill(first["engine-pids"][0], signal.SIGKILL)
        during = [generate(url, 5) for _ in range(4)]  # served by the other engine meanwhile
        assert [r.status_code for r in during] == [200] * 4
        assert [r.status_code for r in (a.result() for a in answers)] == [200] * 8
        assert all(a.result().json()["completion_tokens"] == 300 for a in answers)
        wait_until(lambda: len(engine_pids(url)) == 2 and first["engine-pids"][0] not in engine_pids(url),
                   timeout=60)


def test_an_engine_that_does_not_answer_gives_503_not_500_and_answers_again_once_it_moves(tiny_model_dir):
    """A stalled engine (stopped here with SIGSTOP, as a hung driver call would stop it): the worker's question
    times out into a 503, and no late answer is taken for a later question."""
    with running_server("dynamic", tiny_model_dir) as url:
        [engine_pid] = health(url).json()["engine-pids"]
        os.kill(engine_pid, signal.SIGSTOP)
        try:
            stalled = requests.get(url + "/stats", timeout=60)
        finally:
            os.kill(engine_pid, signal.SIGCONT)
        assert stalled.status_code == 503 and "did not answer" in stalled.json()["error"]["message"]
        assert stalled.headers["Retry-After"]
        for _ in range(3):  # each answer is its own question's, whatever came late
            assert "requests-finished" in requests.get(url + "/stats", timeout=60).json()
            assert "steps" in requests.get(url + "/timeline", timeout=60).json()


def test_a_reloaded_server_still_removes_its_metrics_directory_when_it_stops(tiny_model_dir):
    """SIGHUP re-reads gunicorn's config and replaces the workers; the directory the server made is still its
    own to remove."""
    pattern = os.path.join(tempfile.gettempdir(), "effective-batching-metrics-*")
    before = set(glob.glob(pattern))
    with running_server("dynamic", tiny_model_dir) as url:
        worker = health(url).json()["pid"]
        [directory] = set(glob.glob(pattern)) - before  # made by this server as it started
        os.kill(os.getpgid(worker), signal.SIGHUP)  # the master leads the server's process group
        wait_until(lambda: serving(url).get("pid") not in (None, worker), timeout=60)
        assert generate(url, 2).json()["completion_tokens"] == 2
    assert not os.path.exists(directory)


def test_a_starting_server_answers_503_starting_until_its_engines_serve(tiny_model_dir, tmp_path):
    """The workers answer while the engines load the model (they import torch and build it; a worker imports
    neither): a load balancer or a Kubernetes probe gets "starting", not a connection that hangs."""
    settings = {"MODEL": tiny_model_dir, "WEIGHTS": "pretrained", "DEVICE": "cpu", "KV_CACHE_GB": "0.2",
                "ENGINES": "2"}
    with open(tmp_path / "server.log", "w+") as log:
        server = server_process.start_server("dynamic", settings, log)
        try:
            answers, scrapes = [], []
            while not answers or answers[-1].status_code != 200:
                with contextlib.suppress(requests.ConnectionError):  # gunicorn not listening yet
                    answers.append(requests.get(server.url + "/health", timeout=60))
                    scrapes.append(requests.get(server.url + "/metrics", timeout=60))
                assert server.proc.poll() is None, "the server exited"
                time.sleep(0.05)
            starting = [r for r in answers if r.status_code == 503]
            assert starting and all(r.json()["error"]["code"] == "starting" for r in starting)
            metrics = [(r.status_code, r.headers["Content-Type"]) for r in scrapes]
            assert metrics and all(code == 200 and "text/plain" in kind for code, kind in metrics)  # never 503
            assert answers[-1].json()["engines-serving"] == 2  # a worker serves once it reaches every engine
        finally:
            server.stop()
