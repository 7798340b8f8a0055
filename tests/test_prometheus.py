"""GET /metrics (parsed by prometheus_client's parser; counters add up to what was sent, with one worker and with
two) and GET /health (503 when the engine thread died or is stuck, in-process)."""
import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from conftest import in_process, running_server
from telemetry.prometheus import EngineMetrics

MODEL = "tiny-gpt2"


def scrape(url: str) -> dict:
    """{(sample name, labels without model_name/policy): value}, checking every sample carries both labels."""
    samples = {}
    for family in text_string_to_metric_families(requests.get(url + "/metrics").text):
        for s in family.samples:
            if not s.name.startswith("vllm:"):
                continue
            labels = dict(s.labels)
            assert labels.pop("model_name") == MODEL and labels.pop("policy") in ("dynamic", "static", "nobatch")
            samples[(s.name, tuple(sorted(labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_counters_and_histograms_add_up_to_what_was_sent(tiny_model_dir):
    # 8 blocks of 16 tokens: four 62-token requests at once cannot all fit, so some are preempted
    with running_server("dynamic", tiny_model_dir, SERVED_MODEL_NAME=MODEL, KV_BLOCKS=8) as url:
        sequences = []  # (prompt tokens, generated tokens, finish reason) per sequence the engine ran
        for n in (2, 5, 9):
            body = requests.post(url + "/inference", json={"prompt": "Request 1", "num_tokens": n}).json()
            sequences.append((body["prompt_tokens"], n, body["finish_reason"]))
        c = requests.post(url + "/v1/completions", json={"prompt": "a b c", "max_tokens": 4, "n": 2}).json()
        sequences += [(3, 4, ch["finish_reason"]) for ch in c["choices"]]
        full = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 12, "temperature": 0,
                                                            "ignore_eos": True}).json()
        sequences.append((1, 12, "length"))
        stop = full["choices"][0]["text"][-4:]
        cut = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 12, "temperature": 0,
                                                           "ignore_eos": True, "stop": stop}).json()
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["usage"]["completion_tokens"] < 12  # usage counts the text's tokens, not the stop string's
        sequences.append((1, 12, "stop"))  # /metrics counts every token generated
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            bodies = pool.map(lambda i: requests.post(url + "/inference", json={"prompt": "a b", "num_tokens": 60}),
                              range(4))
            sequences += [(2, 60, r.json()["finish_reason"]) for r in bodies]
        assert requests.post(url + "/v1/completions", json={"prompt": "x", "top_p": 7}).status_code == 400

        m = scrape(url)
        stats = requests.get(url + "/stats").json()
    completed = len(sequences)
    assert value(m, "vllm:request_success_total", finished_reason="length") == completed - 1
    assert value(m, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(m, "vllm:request_success_total", finished_reason="abort") == 0
    assert value(m, "vllm:request_success_total", finished_reason="error") == 0
    assert value(m, "vllm:prompt_tokens_total") == sum(p for p, _, _ in sequences)  # each of n samples prefills
    assert value(m, "vllm:generation_tokens_total") == sum(g for _, g, _ in sequences)
    assert value(m, "vllm:request_prompt_tokens_sum") == sum(p for p, _, _ in sequences)
    assert value(m, "vllm:request_generation_tokens_sum") == sum(g for _, g, _ in sequences)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prompt_tokens", "request_generation_tokens"):
        assert value(m, f"vllm:{histogram}_count") == completed
        assert value(m, f"vllm:{histogram}_bucket", le="+Inf") == completed
    assert value(m, "vllm:inter_token_latency_seconds_count") == sum(g - 1 for _, g, _ in sequences)
    assert value(m, "vllm:num_preemptions_total") == stats["preemptions"] > 0
    assert value(m, "vllm:num_requests_running", engine="0") == value(m, "vllm:num_requests_waiting", engine="0") == 0
    assert value(m, "vllm:kv_cache_usage_perc", engine="0") == 0  # each engine's gauges carry its number


def test_histograms_time_each_request_from_its_arrival():
    """Known timestamps in, known sums out: TTFT and E2E from arrival (not from scheduling), queue time up to
    scheduling, inter-token gaps between tokens."""
    metrics = EngineMetrics("known-timestamps", "dynamic")
    metrics.record(SimpleNamespace(arrival_time=10.0, scheduled_time=10.5, first_token_time=12.0,
                                   token_times=[12.0, 12.5, 13.5], finish_time=13.5, prompt_ids=[1, 2, 3],
                                   num_preemptions=0, finish_reason="length", cached_tokens=2))
    labels = {"model_name": "known-timestamps", "policy": "dynamic"}

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(f"vllm:{name}", labels)

    assert sample("time_to_first_token_seconds_sum") == 2.0
    assert sample("e2e_request_latency_seconds_sum") == 3.5
    assert sample("request_queue_time_seconds_sum") == 0.5
    assert (sample("inter_token_latency_seconds_sum"), sample("inter_token_latency_seconds_count")) == (1.5, 2)
    assert sample("request_generation_tokens_sum") == 3 and sample("request_prompt_tokens_sum") == 3
    assert (sample("prefix_cache_queries_total"), sample("prefix_cache_hits_total")) == (3, 2)


def stale_counter(directory: str) -> None:
    """What an earlier server left behind: 1000 successful requests in a worker's file."""
    subprocess.run([sys.executable, "-c", (
        "from prometheus_client import Counter; Counter('vllm:request_success', '', "
        "['model_name', 'policy', 'finished_reason']).labels('tiny-gpt2', 'dynamic', 'length').inc(1000)")],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}, check=True)


def test_two_workers_feed_one_engine_add_up_and_a_dead_workers_gauges_vanish(tiny_model_dir, tmp_path):
    directory = str(tmp_path)
    stale_counter(directory)
    with running_server("dynamic", tiny_model_dir, SERVED_MODEL_NAME=MODEL, WORKERS=2,
                        PROMETHEUS_MULTIPROC_DIR=directory) as url:
        wait_until(lambda: len({requests.get(url + "/health").json()["pid"] for _ in range(10)}) == 2)
        assert len({tuple(requests.get(url + "/health").json()["engine-pids"]) for _ in range(10)}) == 1
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: requests.post(url + "/inference", json={"prompt": "hi", "num_tokens": 3})
                                  .status_code, range(16)))
        assert codes == [200] * 16
        for _ in range(4):  # whichever worker answers the scrape
            m = scrape(url)
            assert value(m, "vllm:request_success_total", finished_reason="length") == 16
            assert value(m, "vllm:generation_tokens_total") == 48
            assert requests.get(url + "/stats").json()["requests-finished"] == 16  # the engine's: every worker's

        victim = requests.get(url + "/health").json()["pid"]
        assert os.path.exists(os.path.join(directory, f"gauge_livemax_{victim}.db"))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(os.path.join(directory, f"gauge_livemax_{victim}.db")))
        # both workers serving again: the one gunicorn starts in the victim's place among them
        wait_until(lambda: all(requests.get(url + "/health").status_code == 200 for _ in range(8)))
        assert value(scrape(url), "vllm:request_success_total", finished_reason="length") == 16  # counters stay


# ---- /health, in-process ----

def test_engine_death_is_logged_with_its_traceback_and_surfaced(tiny_model_dir, caplog):
    with in_process(tiny_model_dir) as (client, manager):
        def broken_schedule():  # dies at the first request, so that one is in flight
            if manager.scheduler.waiting:
                raise RuntimeError("scheduler bug")
            return []

        manager.scheduler.schedule = broken_schedule
        in_flight = client.post("/inference", json={"prompt": "x", "num_tokens": 3})
        assert in_flight.status_code == 500 and "scheduler bug" in in_flight.json["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "scheduler bug" in health.json["error"]["message"]
        after = client.post("/v1/completions", json={"prompt": "x"})
        assert after.status_code == 503 and after.json["error"]["code"] == "engine_unhealthy"
    [death] = [r for r in caplog.records if r.getMessage() == "engine thread died"]
    assert death.levelno == logging.ERROR and "scheduler bug" in caplog.text and "Traceback" in caplog.text


def test_health_is_503_from_the_moment_the_engine_fails_while_its_thread_is_still_dying(tiny_model_dir):
    with in_process(tiny_model_dir) as (client, manager):
        dying, let_go = threading.Event(), threading.Event()
        manager.on_fatal.append(lambda reason: dying.set() or let_go.wait(30))  # the thread stays alive in here

        def broken_schedule():
            raise RuntimeError("scheduler bug")

        manager.scheduler.schedule = broken_schedule
        assert dying.wait(30) and manager.alive
        try:
            assert client.get("/health").status_code == 503
            assert client.post("/inference", json={"prompt": "x", "num_tokens": 2}).status_code == 503
        finally:
            let_go.set()


def test_health_is_503_while_the_engine_is_stuck_and_200_once_it_moves(tiny_model_dir):
    with in_process(tiny_model_dir, health_stall_s=0.3) as (client, manager):
        assert client.get("/health").status_code == 200
        unstuck = threading.Event()
        working = manager.runner.launch
        manager.runner.launch = lambda plan: unstuck.wait() and working(plan)
        request = threading.Thread(target=client.post, args=("/inference",),
                                   kwargs={"json": {"prompt": "x", "num_tokens": 2}})
        request.start()
        wait_until(lambda: client.get("/health").status_code == 503, timeout=10)
        assert client.get("/health").json["error"]["message"] == "the engine is stuck"
        unstuck.set()
        request.join()
        wait_until(lambda: client.get("/health").status_code == 200, timeout=10)


def test_observe_many_counts_as_one_observe_per_value():
    from prometheus_client import CollectorRegistry, Histogram
    from telemetry.prometheus import ITL_BUCKETS, observe_many
    registry = CollectorRegistry()
    one_by_one = Histogram("one", "", buckets=ITL_BUCKETS, registry=registry)
    together = Histogram("many", "", buckets=ITL_BUCKETS, registry=registry)
    values = [0.0, 0.01, 0.0100001, 0.02, 0.3, 0.3, 79.9, 80.0, 500.0]  # bounds, between, above the last
    for v in values:
        one_by_one.observe(v)
    observe_many(together, values)
    observe_many(together, [])
    samples = {m.name: {(s.name.split("_", 1)[1], tuple(s.labels.items())): s.value for s in m.samples
                        if not s.name.endswith("_created")} for m in registry.collect()}
    assert samples["many"] == samples["one"]
    assert samples["many"][("count", ())] == len(values)
