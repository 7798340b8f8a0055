"""A short soak: a few hundred mixed requests at once (plain and streamed, both APIs, clients that leave, invalid
ones). Every valid request is answered in full, every invalid one gets its error, and afterwards nothing is
running or waiting, every KV block is free and the metrics account for every sequence."""
import concurrent.futures
import json
import random
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import idle_with_every_block_free, open_request, read_until, running_server, still_serves, wait_until

INVALID = [
    ("/inference", {"prompt": "x"}),
    ("/inference", {"prompt": "x", "num_tokens": 0}),
    ("/inference", {"prompt": "x", "num_tokens": 2000}),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}),
    ("/v1/completions", {"prompt": "x", "temperature": -1}),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "x", "best_of": 3}),
]


def sse_data(resp: requests.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in resp.text.split("\n\n") if line]


def send(url: str, kind: str, rng: random.Random) -> int:
    """Send one request of `kind`; check its answer; return how many sequences it put into the engine."""
    tokens = rng.randint(1, 12)
    if kind == "inference":
        r = requests.post(url + "/inference", json={"prompt": f"Request {tokens}", "num_tokens": tokens})
        assert r.status_code == 200 and r.json()["completion_tokens"] == tokens
        return 1
    if kind == "v1":
        n = rng.randint(1, 2)
        r = requests.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": tokens, "n": n,
                                                         "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n * tokens
        return n
    if kind == "v1_stream":
        r = requests.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": tokens, "stream": True,
                                                         "ignore_eos": True,
                                                         "stream_options": {"include_usage": True}})
        *_, usage, done = sse_data(r)
        assert done == "[DONE]" and json.loads(usage)["usage"]["completion_tokens"] == tokens
        return 1
    if kind == "inference_stream":
        r = requests.post(url + "/inference", json={"prompt": "Hi", "num_tokens": tokens, "stream": True})
        *_, last, done = sse_data(r)
        assert done == "[DONE]" and json.loads(last)["finish_reason"] == "length"
        return 1
    if kind == "drop_stream":
        sock = open_request(url, "/v1/completions", {"prompt": "x", "max_tokens": 1000, "stream": True,
                                                     "ignore_eos": True})
        read_until(sock, b"data: ")
        sock.close()
        return 1
    if kind == "drop_request":  # long enough that the server sees the client leave (0.5 s poll) before it ends
        sock = open_request(url, "/inference", {"prompt": "x", "num_tokens": 1000})
        time.sleep(rng.uniform(0, 0.3))
        sock.close()
        return 1
    path, body = rng.choice(INVALID)
    r = requests.post(url + path, json=body)
    assert r.status_code in (400, 404) and set(r.json()["error"]) == {"message", "type", "param", "code"}
    return 0


KINDS = {"inference": 25, "v1": 20, "v1_stream": 15, "inference_stream": 10, "drop_stream": 10,
         "drop_request": 10, "invalid": 10}


@pytest.mark.parametrize("overlap", ["auto", "true"], ids=["one-step-at-a-time", "overlapped"])
def test_mixed_traffic_is_answered_and_leaves_nothing_behind(tiny_model_dir, overlap):
    rng = random.Random(0)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=300)
    seeds = [rng.randrange(1 << 30) for _ in kinds]
    with running_server("dynamic", tiny_model_dir, OVERLAP_STEPS=overlap) as url:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            sequences = list(pool.map(lambda ks: send(url, ks[0], random.Random(ks[1])), zip(kinds, seeds)))
        wait_until(lambda: idle_with_every_block_free(url))
        success = {s.labels["finished_reason"]: s.value
                   for family in text_string_to_metric_families(requests.get(url + "/metrics").text)
                   if family.name == "vllm:request_success" for s in family.samples}
        assert still_serves(url)
    dropped = sum(kinds.count(k) for k in ("drop_stream", "drop_request"))
    assert success["abort"] == dropped
    assert success["length"] + success["stop"] == sum(sequences) - dropped
    assert success["error"] == 0
