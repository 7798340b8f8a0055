"""Server-sent events read by a plain HTTP client: framing, tokens arriving while the request still runs, UTF-8,
and errors mid-stream (those in-process, with a scripted model)."""
import json

import pytest
import requests

from api import sse
from api.errors import ApiError
from conftest import fail_step, in_process, running_server, scripted
from engine.tokenizer import encode


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir) as url:
        yield url


def events(resp: requests.Response):
    """Yield each event's data as it arrives, checking the framing: `data: ...` then a blank line."""
    buffer = b""
    for piece in resp.iter_content(chunk_size=None):
        buffer += piece
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            assert frame.startswith(b"data: ") and b"\n" not in frame
            yield frame.removeprefix(b"data: ").decode("utf-8")
    assert buffer == b""


def stream(url: str, path: str, body: dict):
    resp = requests.post(url + path, json=body, stream=True)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    return resp


def test_v1_stream_is_json_chunks_then_done(url):
    resp = stream(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "stream": True})
    assert resp.headers["X-Request-Id"]
    *chunks, done = list(events(resp))
    assert done == "[DONE]"
    chunks = [json.loads(c) for c in chunks]
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_inference_stream_gives_text_deltas_of_the_plain_completion(url):
    body = {"prompt": "Request 7", "num_tokens": 30, "seed": 5}
    plain = requests.post(url + "/inference", json=body).json()
    *chunks, done = list(events(stream(url, "/inference", {**body, "stream": True})))
    chunks = [json.loads(c) for c in chunks]
    assert done == "[DONE]" and len(chunks) > 1
    assert "".join(c["text"] for c in chunks) == plain["text"]
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


@pytest.mark.parametrize("path, body", [
    ("/inference", {"prompt": "Long", "num_tokens": 600, "stream": True}),
    ("/v1/completions", {"prompt": "Long", "max_tokens": 600, "stream": True, "ignore_eos": True}),
])
def test_first_tokens_arrive_while_the_request_is_still_running(url, path, body):
    received = events(stream(url, path, body))
    next(received)
    assert requests.get(url + "/stats").json()["running"] == 1  # the rest is not generated yet
    rest = list(received)
    assert rest[-1] == "[DONE]" and len(rest) > 20


def test_characters_split_across_tokens_arrive_whole(url):
    prompt_ids = encode("naïve café 🎉!")  # 🎉 is three tokens of one, one and two bytes
    resp = stream(url, "/v1/completions", {"prompt": prompt_ids, "max_tokens": 5, "echo": True, "stream": True})
    first = next(events(resp))
    assert json.loads(first)["choices"][0]["text"].startswith("naïve café 🎉!")
    assert "🎉" in first  # sent as UTF-8, not as \u escapes


# ---- in-process: a scripted model, and an engine that fails mid-stream ----

def streamed_events(resp) -> list[str]:
    return [frame.removeprefix(b"data: ").decode() for frame in b"".join(resp.response).split(b"\n\n") if frame]


def test_a_character_generated_over_three_tokens_is_streamed_once_complete(tiny_model_dir):
    with in_process(tiny_model_dir) as (client, manager):
        scripted(manager, encode("ok 🎉 done"))
        resp = client.post("/inference", json={"prompt": "x", "num_tokens": len(encode("ok 🎉 done")),
                                                "stream": True}, buffered=False)
        *chunks, done = streamed_events(resp)
    texts = [json.loads(c)["text"] for c in chunks]
    assert "".join(texts) == "ok 🎉 done"
    assert not any("\ufffd" in t for t in texts)


def test_engine_failure_mid_stream_is_an_error_event_then_done(tiny_model_dir):
    with in_process(tiny_model_dir) as (client, manager):
        fail_step(manager, 5, "device on fire")
        resp = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 50, "stream": True},
                           buffered=False)
        *chunks, error, done = streamed_events(resp)
    assert done == "[DONE]" and len(chunks) >= 1
    err = json.loads(error)["error"]
    assert err["code"] == "inference_failed" and "device on fire" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_sse_releases_when_the_client_goes_away_mid_stream():
    released = []
    frames = sse.sse_response(iter([{"a": 1}, {"a": 2}]), lambda: released.append(True)).response
    assert next(frames) == b'data: {"a":1}\n\n'
    frames.close()  # what gunicorn does when a write fails
    assert released == [True]


def test_sse_error_event_has_the_error_shape():
    def failing():
        yield {"a": 1}
        raise ApiError(503, "overloaded", code="overloaded")

    frames = list(sse.sse_response(failing(), lambda: None).response)
    assert frames[0] == b'data: {"a":1}\n\n' and frames[-1] == b"data: [DONE]\n\n"
    assert json.loads(frames[1].removeprefix(b"data: "))["error"]["code"] == "overloaded"
