"""Workers whose engine died exit, gunicorn's master starts a fresh engine and fresh workers, and they serve: on a
real server whose engine process is killed, as the kernel's out-of-memory killer or a driver fault would."""
import concurrent.futures
import os
import signal

import pytest
import requests

from conftest import running_server, wait_until


def health(url: str) -> requests.Response:
    return requests.get(url + "/health", timeout=60)


def answering_pid(url: str) -> int | None:
    """The pid of the worker that says it is healthy, or None."""
    r = health(url)
    return r.json()["pid"] if r.status_code == 200 else None


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_whose_engine_died_are_replaced_with_a_fresh_engine(tiny_model_dir, workers):
    with running_server("dynamic", tiny_model_dir, WORKERS=workers) as url, \
            concurrent.futures.ThreadPoolExecutor() as pool:
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
        assert health(url).json()["engine-pid"] != first["engine-pid"]
