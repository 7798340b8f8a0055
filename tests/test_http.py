"""The real server (./server.sh -> gunicorn) on a free localhost port: the original API, bad input, keys,
/stats, and starting up (or failing to, in one line)."""
import csv
import glob
import os
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import ROOT, running_server, server_stats, wait_until
from engine.tokenizer import decode, encode

ORIGINAL_STATS_KEYS = {"latency-per-token", "throughput", "total-tokens-handled", "total-elapsed-time"}
HONEST_STATS_KEYS = {"wall-clock-throughput", "ttft", "tpot", "e2e-latency", "running", "waiting", "kv-cache-usage",
                     "policy", "model", "weights", "device", "dtype"}


def post(url: str, body: dict | str, **kw) -> requests.Response:
    """POST /inference; a str body is sent as it is (JSON that Python's json.dumps would not write)."""
    if isinstance(body, str):
        return requests.post(url + "/inference", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    return requests.post(url + "/inference", json=body, timeout=60, **kw)


def read_token_csv(path: str) -> dict[int, float]:
    with open(path, newline="") as f:
        return {int(row["num_tokens"]): float(row["latency"]) for row in csv.DictReader(f)}


@pytest.mark.parametrize("policy", ["nobatch", "static", "dynamic"])
def test_concurrent_requests_are_all_answered_and_counted(tiny_model_dir, policy, tmp_path):
    with running_server(policy, tiny_model_dir, DATA_DIR=tmp_path) as url:
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
    # every num_tokens was asked once: the CSV holds each request's own latency
    rows = read_token_csv(os.path.join(tmp_path, f"token_data_{policy}.csv"))
    assert rows == pytest.approx({b["num_tokens"]: r.json()["latency"] for b, r in zip(bodies, answers)}, rel=1e-3)


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
    ({"prompt": "hi", "num_tokens": 1 << 63}, "num_tokens"),
    ({"prompt": "hi", "num_tokens": 5, "top_k": 1 << 63}, "top_k"),
    ({"prompt": "hi", "num_tokens": 5, "top_k": 50258}, "top_k"),
    ({"prompt": "hi", "num_tokens": 5, "temperature": 10 ** 400}, "temperature"),
    ({"prompt": "hi", "num_tokens": 5, "top_p": 10 ** 400}, "top_p"),
    ('{"prompt": "hi", "num_tokens": 5, "temperature": 1e400}', "temperature"),  # infinity
    ('{"prompt": "hi", "num_tokens": 5, "top_p": NaN}', "top_p"),
    ({"prompt": "hi", "num_tokens": 5, "seed": 1 << 64}, "seed"),
    ({"prompt": "hi", "num_tokens": 5, "logprobs": 1 << 63}, "logprobs"),
    ({"prompt": "hi \ud800", "num_tokens": 5}, "prompt"),
    ({"prompt": "hi", "num_tokens": 5, "stop": ["\udc00"]}, "stop"),
])
def test_bad_input_gets_a_400_naming_the_field(server, body, param):
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_a_bad_parameter_fails_only_its_own_request(server):
    running = ThreadPoolExecutor(1).submit(post, server, {"prompt": "Request 1", "num_tokens": 300})
    wait_until(lambda: server_stats(server)["running"] == 1)
    hostile = post(server, {"prompt": "x", "num_tokens": 5, "top_k": 9223372036854775808})
    assert hostile.status_code == 400 and hostile.json()["error"]["param"] == "top_k"
    answer = running.result()
    assert answer.status_code == 200 and answer.json()["completion_tokens"] == 300


def test_prompt_plus_tokens_over_the_context_says_so(server):
    r = post(server, {"prompt": "hello " * 1000, "num_tokens": 100})
    assert r.status_code == 400
    assert "maximum context length is 1024 tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b'"a string"', b""])
def test_a_body_that_is_not_a_json_object_is_a_400(server, data):
    r = requests.post(server + "/inference", data=data, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_json_nested_too_deeply_is_a_400(server):
    r = requests.post(server + "/inference", data="[" * 4000 + "]" * 4000,  # Python parses about 1000 deep
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_an_oversized_body_is_a_413_naming_the_setting(server):
    r = post(server, {"prompt": "x" * 20_000, "num_tokens": 1})
    assert r.status_code == 413 and "MAX_BODY_BYTES (8192 bytes)" in r.json()["error"]["message"]


def test_an_oversized_chunked_body_is_a_413_too(server):
    chunks = (b'{"prompt": "' if i == 0 else b"x" * 1000 for i in range(20))  # no Content-Length: chunked
    r = requests.post(server + "/inference", data=chunks, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413 and "MAX_BODY_BYTES" in r.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_sent_as_json_is_a_415(server, content_type):
    """What a web page can make a browser send to any address without asking (a 'simple' cross-site request)."""
    headers = {"Content-Type": content_type} if content_type else {}
    r = requests.post(server + "/inference", data='{"prompt": "hi", "num_tokens": 2}', headers=headers, timeout=10)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]


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
    assert h["attention"] == "reference" and h["cuda-graphs"] == 0 and h["startup-s"] > 0
    assert h["overlap-steps"] is False  # auto: a CPU step is done when it is launched
    assert h["max-batch"] == 128  # MAX_BATCH unset: a CPU's default
    assert h["kv-cache-tokens"] > 0 and h["engines"] == h["engines-serving"] == 1
    assert h["engine-pids"][0] not in (h["pid"], None)  # the engine has its own process


def test_the_server_keeps_serving_after_bad_input(server):
    for _ in range(3):
        post(server, {"prompt": "", "num_tokens": 1})
    assert post(server, {"prompt": "still here?", "num_tokens": 3}).status_code == 200


def test_greedy_text_is_the_reference_models_greedy_text(server, tiny_hf_model):
    prompt_ids = encode("Request 1")
    with torch.no_grad():  # independent of the server: HF's generate, greedy
        ids = tiny_hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False,
                                     pad_token_id=0)[0, len(prompt_ids):]
    assert post(server, {"prompt": "Request 1", "num_tokens": 10, "temperature": 0}).json()["text"] == \
        decode(ids.tolist())


def test_two_workers_batch_their_requests_in_one_engine_and_each_gets_the_reference_text(tiny_model_dir,
                                                                                          tiny_hf_model):
    prompts = [f"Request {i}" for i in range(8)]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = encode(prompt)
            out = tiny_hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
            expected.append(decode(out[0, len(ids):].tolist()))
    with running_server("dynamic", tiny_model_dir, WORKERS=2) as url:
        wait_until(lambda: len({requests.get(url + "/health").json()["pid"] for _ in range(10)}) == 2)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: post(url, {"prompt": p, "num_tokens": 12, "temperature": 0}), prompts))
        stats = requests.get(url + "/stats").json()
    assert [a.json()["text"] for a in answers] == expected
    assert stats["requests-finished"] == 8  # whichever worker answers /stats: the engine counted every request


# ---- /stats ----

def test_stats_over_a_window_count_only_the_requests_since_its_start(server):
    post(server, {"prompt": "before", "num_tokens": 3})
    start = server_stats(server)["server-time"]
    for n in (2, 4):
        assert post(server, {"prompt": "during", "num_tokens": n}).status_code == 200
    window = requests.get(server + "/stats", params={"since": start}, timeout=10).json()
    lifetime = server_stats(server)
    assert window["requests-finished"] == 2 and window["total-tokens-handled"] == 6 and window["since"] == start
    assert window["finish-reasons"] == {"length": 2}
    assert lifetime["requests-finished"] > 2  # the original figures still cover everything since start-up


def test_stats_window_needs_a_number(server):
    r = requests.get(server + "/stats", params={"since": "yesterday"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"


def test_a_test_server_writes_its_data_into_a_temporary_directory(server):
    requests.get(server + "/stats", timeout=10)
    data_dir = os.environ["DATA_DIR"]
    assert os.path.exists(os.path.join(data_dir, "token_data_dynamic.csv"))
    assert not os.path.abspath(data_dir).startswith(ROOT)


# ---- keys ----

def loads_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def test_only_the_engine_process_loads_torch(server):
    """gunicorn's master and its workers import no torch: a worker forks and starts in a third of a second, in a
    quarter of the memory (bench/results/cpu/notes.md)."""
    h = requests.get(server + "/health", timeout=10).json()
    worker, [engine] = h["pid"], h["engine-pids"]
    assert not loads_torch(worker) and not loads_torch(os.getpgid(worker))  # the master leads the process group
    assert loads_torch(engine)


@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, key="s3cret") as url:
        yield url


def test_a_key_is_required_when_the_server_has_one(keyed):
    body = {"prompt": "hi", "num_tokens": 2}
    assert post(keyed, body).status_code == 401
    assert post(keyed, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(keyed, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert post(keyed, body, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert requests.get(keyed + "/stats", timeout=10).status_code == 401
    assert requests.get(keyed + "/health", timeout=10).status_code == 200


def test_the_bearer_scheme_is_case_insensitive(keyed):
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert post(keyed, {"prompt": "hi", "num_tokens": 1}, headers={"Authorization": f"{scheme} s3cret"}) \
            .status_code == 200


def test_a_wrong_x_api_key_does_not_shadow_a_right_bearer_token(keyed):
    headers = {"Authorization": "Bearer s3cret", "X-API-Key": "stale"}
    assert post(keyed, {"prompt": "hi", "num_tokens": 1}, headers=headers).status_code == 200
    headers = {"Authorization": "Bearer stale", "X-API-Key": "also-stale"}
    assert post(keyed, {"prompt": "hi", "num_tokens": 1}, headers=headers).status_code == 401


# ---- starting, or failing to start ----

def test_unknown_policy_prints_usage_and_fails():
    r = subprocess.run([os.path.join(ROOT, "server.sh"), "fastest"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "usage: ./server.sh nobatch|static|dynamic" in r.stderr and "unknown policy 'fastest'" in r.stderr


def test_an_empty_key_is_refused_not_taken_as_no_key():
    r = subprocess.run([os.path.join(ROOT, "server.sh"), "dynamic", ""], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "the API key is empty" in r.stderr


def metrics_dirs() -> set[str]:
    return set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "effective-batching-metrics-*")))


def start(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(ROOT, "server.sh"), "dynamic"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_a_port_in_use_fails_in_one_line_and_leaves_nothing_behind(tiny_model_dir):
    before = metrics_dirs()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = start({"PORT": str(taken.getsockname()[1]), "MODEL": tiny_model_dir})
    errors = [line for line in r.stderr.splitlines() if "[ERROR]" in line]
    assert r.returncode != 0 and len(errors) == 1 and "Address already in use" in errors[0]
    assert metrics_dirs() == before


@pytest.mark.parametrize("env, says", [({"MAX_BATCH": "abc"}, "MAX_BATCH must be an integer; got 'abc'"),
                                       ({"PREFIX_CACHING": "flase"}, "PREFIX_CACHING must be true or false"),
                                       ({"CLIENT_TIMEOUT_S": "30s"}, "CLIENT_TIMEOUT_S must be a number")])
def test_a_mistyped_setting_stops_the_server_in_one_line(env, says):
    r = start({"PORT": "0", **env})
    assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr


def test_weights_that_cannot_load_fail_in_one_line_that_says_what_to_do(tmp_path):
    r = start({"PORT": "0", "MODEL": str(tmp_path), "WEIGHTS": "pretrained", "DEVICE": "cpu"})
    failure = [line for line in r.stderr.splitlines() if "cannot serve" in line]
    assert r.returncode == 3 and len(failure) == 1 and "Traceback" not in r.stderr
    assert "WEIGHTS=random" in failure[0] and "config.json" in failure[0]
