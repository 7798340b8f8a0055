"""A worker whose engine thread died exits, and gunicorn starts a fresh one that serves: on a real server whose
engine has a planted bug (tests/engine_dies_conf.py)."""
import os

import requests

from conftest import running_server, wait_until

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_dies_conf.py")


def health(url: str) -> requests.Response:
    return requests.get(url + "/health", timeout=60)


def answering_pid(url: str) -> int | None:
    """The pid of the worker that says it is healthy, or None."""
    r = health(url)
    return r.json()["pid"] if r.status_code == 200 else None


def test_a_worker_whose_engine_died_is_replaced_by_a_fresh_one(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, GUNICORN_CONF=CONF) as url:
        first = health(url).json()["pid"]
        died = requests.post(url + "/inference", json={"prompt": "die", "num_tokens": 3}, timeout=60)
        assert died.status_code == 500 and "engine thread died" in died.json()["error"]["message"]
        wait_until(lambda: answering_pid(url) not in (None, first), timeout=60)
        ok = requests.post(url + "/inference", json={"prompt": "live", "num_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["completion_tokens"] == 3
