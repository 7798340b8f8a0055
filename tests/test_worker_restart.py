"""A worker whose engine died exits, and gunicorn starts a fresh one that serves: on a real server whose engine
process is killed, as the kernel's out-of-memory killer or a driver fault would."""
import concurrent.futures
import os
import signal

import requests

from conftest import running_server, wait_until


def health(url: str) -> requests.Response:
    return requests.get(url + "/health", timeout=60)


def answering_pid(url: str) -> int | None:
    """The pid of the worker that says it is healthy, or None."""
    r = health(url)
    return r.json()["pid"] if r.status_code == 200 else None


def test_a_worker_whose_engine_died_is_replaced_by_a_fresh_one(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir) as url, concurrent.futures.ThreadPoolExecutor() as pool:
        first = health(url).json()
        long = pool.submit(requests.post, url + "/inference", json={"prompt": "long", "num_tokens": 1000},
                           timeout=60)
        wait_until(lambda: requests.get(url + "/stats", timeout=10).json()["running"] == 1)
        os.kill(first["engine-pid"], signal.SIGKILL)
        died = long.result()
        assert died.status_code == 500 and "engine process died" in died.json()["error"]["message"]
        wait_until(lambda: answering_pid(url) not in (None, first["pid"]), timeout=60)
        ok = requests.post(url + "/inference", json={"prompt": "live", "num_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["completion_tokens"] == 3
