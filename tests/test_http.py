"""The real server (./server.sh -> gunicorn) on a free localhost port: the original API, bad input, keys."""
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import ROOT, running_server
from engine.tokenizer import encode

ORIGINAL_STATS_KEYS = {"latency-per-token", "throughput", "total-tokens-handled", "total-elapsed-time"}
HONEST_STATS_KEYS = {"wall-clock-throughput", "ttft", "tpot", "e2e-latency", "running", "waiting", "kv-cache-usage",
                     "policy", "model", "weights", "device", "dtype"}


def post(url: str, body, **kw) -> requests.Response:
    return requests.post(url + "/inference", json=body, timeout=60, **kw)


@pytest.mark.parametrize("policy", ["nobatch", "static", "dynamic"])
def test_concurrent_requests_are_all_answered_and_counted(tiny_model_dir, policy):
    with running_server(policy, tiny_model_dir) as url:
        bodies = [{"prompt": f"Request {i}", "num_tokens": n} for i, n in enumerate([1, 5, 12, 3, 8, 20, 2, 9])]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: post(url, b), bodies))
        for body, r in zip(bodies, answers):
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["completion"].startswith(body["prompt"]) and out["completion"] == body["prompt"] + out["text"]
            assert out["completion_tokens"] == body["num_tokens"]
            assert out["prompt_tokens"] == len(encode(body["prompt"]))
        stats = requests.get(url + "/stats", timeout=10).json()
        assert ORIGINAL_STATS_KEYS | HONEST_STATS_KEYS <= set(stats)
        assert stats["policy"] == policy and stats["weights"] == "pretrained"
        assert stats["total-tokens-handled"] == sum(b["num_tokens"] for b in bodies)
        assert stats["requests-finished"] == len(bodies)
        latencies = [r.json()["latency"] for r in answers]
        assert stats["total-elapsed-time"] == pytest.approx(sum(latencies), rel=1e-3)
        assert stats["throughput"] == pytest.approx(stats["total-tokens-handled"] / sum(latencies), rel=1e-3)
        assert stats["running"] == 0 and stats["kv-cache-usage"] == 0
        assert os.path.exists(os.path.join(ROOT, "data", f"token_data_{policy}.csv"))


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, MAX_BODY_BYTES=8192) as url:
        yield url


@pytest.mark.parametrize("body, param", [
    ({"num_tokens": 5}, "prompt"),
    ({"prompt": "hi"}, "num_tokens"),
    ({"prompt": "", "num_tokens": 5}, "prompt"),
    ({"prompt": 7, "num_tokens": 5}, "prompt"),
    ({"prompt": "hi", "num_tokens": 0}, "num_tokens"),
    ({"prompt": "hi", "num_tokens": -3}, "num_tokens"),
    ({"prompt": "hi", "num_tokens": 2.5}, "num_tokens"),
    ({"prompt": "hi", "num_tokens": "5"}, "num_tokens"),
    ({"prompt": "hi", "num_tokens": True}, "num_tokens"),
    ({"prompt": "hi", "num_tokens": 1024}, "num_tokens"),
    ({"prompt": "hi", "num_tokens": 5, "temperature": 3}, "temperature"),
    ({"prompt": "hi", "num_tokens": 5, "top_p": 0}, "top_p"),
    ({"prompt": "hi", "num_tokens": 5, "top_k": -2}, "top_k"),
    ({"prompt": "hi", "num_tokens": 5, "stop": ["a", 3]}, "stop"),
    ({"prompt": "hi", "num_tokens": 5, "num_beams": 4}, "num_beams"),
])
def test_bad_input_gets_a_400_naming_the_field(server, body, param):
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_prompt_plus_tokens_over_the_context_says_so(server):
    r = post(server, {"prompt": "hello " * 1000, "num_tokens": 100})
    assert r.status_code == 400
    assert "maximum context length is 1024 tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b'"a string"', b""])
def test_a_body_that_is_not_a_json_object_is_a_400(server, data):
    r = requests.post(server + "/inference", data=data, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_an_oversized_body_is_a_413(server):
    r = post(server, {"prompt": "x" * 20_000, "num_tokens": 1})
    assert r.status_code == 413 and "error" in r.json()


def test_unknown_paths_and_methods_get_json_errors(server):
    r = requests.get(server + "/nope", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(server + "/inference", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_root_hints_at_the_endpoints_on_get_and_post(server):
    for method in (requests.get, requests.post):
        r = method(server + "/", timeout=10)
        assert r.status_code == 200 and "/inference" in r.text


def test_health_reports_the_model(server):
    h = requests.get(server + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["weights"] == "pretrained" and h["device"] == "cpu" and h["dtype"] == "float32"


def test_the_server_keeps_serving_after_bad_input(server):
    for _ in range(3):
        post(server, {"prompt": "", "num_tokens": 1})
    assert post(server, {"prompt": "still here?", "num_tokens": 3}).status_code == 200


def test_greedy_request_is_deterministic(server):
    body = {"prompt": "Request 1", "num_tokens": 10, "temperature": 0}
    assert post(server, body).json()["completion"] == post(server, body).json()["completion"]


def test_a_key_is_required_when_the_server_has_one(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, key="s3cret") as url:
        body = {"prompt": "hi", "num_tokens": 2}
        assert post(url, body).status_code == 401
        assert post(url, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(url, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post(url, body, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert requests.get(url + "/stats", timeout=10).status_code == 401
        assert requests.get(url + "/health", timeout=10).status_code == 200


def test_unknown_policy_prints_usage_and_fails():
    r = subprocess.run([os.path.join(ROOT, "server.sh"), "fastest"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "usage: ./server.sh nobatch|static|dynamic" in r.stderr and "unknown policy 'fastest'" in r.stderr
