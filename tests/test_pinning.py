"""Each gunicorn worker gets a core of its own (PIN_WORKERS) so that passing its GIL between its threads is a switch
on one core; the engine keeps every core."""
import os

import pytest
import requests

import gunicorn_conf
from conftest import running_server


def cpus_of_every_thread(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_a_worker_gets_the_highest_free_core_when_every_worker_can_have_one_and_two_are_left():
    sixteen = set(range(16))
    assert gunicorn_conf.worker_cpu(sixteen, 4, set(), "auto") == 15
    assert gunicorn_conf.worker_cpu(sixteen, 4, {15, 14, None}, "auto") == 13  # None: a worker left unpinned
    assert gunicorn_conf.worker_cpu(set(range(5)), 4, set(), "auto") is None  # 4 workers need 6 cores
    assert gunicorn_conf.worker_cpu(set(range(5)), 4, set(), "true") == 4
    assert gunicorn_conf.worker_cpu({0}, 1, {0}, "true") is None  # no core left: free
    assert gunicorn_conf.worker_cpu(sixteen, 4, set(), "false") is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: pinned or not looks the same")
def test_pinned_worker_runs_every_thread_on_one_core_and_the_engine_on_all(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, PIN_WORKERS="true", WORKERS=1) as url:
        ok = requests.post(url + "/inference", json={"prompt": "Hello", "num_tokens": 3, "stream": True}, timeout=60)
        assert ok.status_code == 200  # a request ran: the thread pool's threads exist
        health = requests.get(url + "/health", timeout=10).json()
        worker = cpus_of_every_thread(health["pid"])
        assert worker == {frozenset({max(os.sched_getaffinity(0))})}
        assert cpus_of_every_thread(health["engine-pids"][0]) == {frozenset(os.sched_getaffinity(0))}


def test_auto_leaves_a_worker_free_when_the_cores_are_too_few(tiny_model_dir):
    cores = len(os.sched_getaffinity(0))
    with running_server("dynamic", tiny_model_dir, PIN_WORKERS="auto", WORKERS=max(1, cores - 1)) as url:
        pid = requests.get(url + "/health", timeout=10).json()["pid"]
        assert cpus_of_every_thread(pid) == {frozenset(os.sched_getaffinity(0))}
