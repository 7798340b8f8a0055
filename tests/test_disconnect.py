"""Clients that go away, and more clients than the queue takes: the server aborts what nobody waits for, frees
every KV block, counts the aborts, answers 503 when full, and keeps serving."""
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import (idle_with_every_block_free, open_request, read_until, running_server, server_stats, still_serves,
                      wait_until)


def finished(url: str, reason: str) -> float:
    for family in text_string_to_metric_families(requests.get(url + "/metrics").text):
        if family.name == "vllm:request_success":
            return sum(s.value for s in family.samples if s.labels["finished_reason"] == reason)
    raise AssertionError("no vllm:request_success in /metrics")


@pytest.fixture(scope="module", params=["auto", "true"], ids=["one-step-at-a-time", "overlapped"])
def url(tiny_model_dir, request):
    """A server on the CPU, where steps overlap only when OVERLAP_STEPS=true: an abort then often meets its
    request's next step already in flight."""
    with running_server("dynamic", tiny_model_dir, OVERLAP_STEPS=request.param) as url:
        assert requests.get(url + "/health").json()["overlap-steps"] == (request.param == "true")
        yield url


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Tell me everything", "max_tokens": 900, "ignore_eos": True, "stream": True}),
    ("/inference", {"prompt": "Tell me everything", "num_tokens": 900, "stream": True}),
])
def test_clients_leaving_mid_stream_are_aborted_and_free_their_blocks(url, path, body):
    aborted_before = finished(url, "abort")
    clients = [open_request(url, path, body) for _ in range(20)]
    for sock in clients:
        read_until(sock, b"data: ")  # it is generating
    assert server_stats(url)["running"] == 20
    for sock in clients:
        sock.close()
    wait_until(lambda: idle_with_every_block_free(url))
    assert finished(url, "abort") - aborted_before == 20
    assert still_serves(url)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Tell me everything", "max_tokens": 900, "ignore_eos": True}),
    ("/inference", {"prompt": "Tell me everything", "num_tokens": 900}),
])
def test_clients_leaving_mid_request_are_aborted_and_free_their_blocks(url, path, body):
    aborted_before = finished(url, "abort")
    clients = [open_request(url, path, body) for _ in range(20)]
    wait_until(lambda: server_stats(url)["running"] == 20)
    assert server_stats(url)["kv-blocks-free"] < server_stats(url)["kv-blocks-total"]
    for sock in clients:
        sock.close()
    wait_until(lambda: idle_with_every_block_free(url))
    assert finished(url, "abort") - aborted_before == 20
    assert still_serves(url)


def test_full_queue_answers_503_with_retry_after_and_recovers(tiny_model_dir):
    with running_server("nobatch", tiny_model_dir, MAX_WAITING=2) as url:
        running = open_request(url, "/inference", {"prompt": "long", "num_tokens": 900})
        wait_until(lambda: server_stats(url)["running"] == 1)
        queued = [open_request(url, "/inference", {"prompt": "short", "num_tokens": 5})]
        wait_until(lambda: server_stats(url)["waiting"] == 1)
        r = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 2})  # 2 > 1 free
        assert r.status_code == 503 and finished(url, "abort") == 0  # refused whole: nothing queued, none aborted
        queued.append(open_request(url, "/inference", {"prompt": "short", "num_tokens": 5}))
        wait_until(lambda: server_stats(url)["waiting"] == 2)

        r = requests.post(url + "/inference", json={"prompt": "one more", "num_tokens": 5})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=tiny_model_dir, prompt="and another", max_tokens=2)
        assert e.value.status_code == 503

        for sock in queued:  # load drops: the queued clients leave, then the running one
            sock.close()
        wait_until(lambda: server_stats(url)["waiting"] == 0)
        assert server_stats(url)["running"] == 1
        running.close()
        wait_until(lambda: idle_with_every_block_free(url))
        assert finished(url, "abort") == 3
        assert requests.post(url + "/inference", json={"prompt": "now", "num_tokens": 5}).status_code == 200
