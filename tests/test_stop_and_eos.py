"""Where a completion ends, and what is reported of the tokens behind its end, on both APIs, plain and streamed:
a stop string (also one that straddles tokens), <|endoftext|>. In-process, with a scripted model that 'samples'
known tokens.

The rule: completion_tokens and logprobs cover the tokens of the returned text; a generated <|endoftext|> and the
tokens that only spell a stop string are not reported (/metrics still counts them as generated)."""
import json

from conftest import in_process, scripted
from engine.tokenizer import EOT_TOKEN, encode

SCRIPT = encode("Say hello world now")  # "Say", " hello", " world", " now"
STOP = "lo wo"  # straddles " hello" and " world"
BEFORE_STOP = "Say hel"


def sse_data(resp) -> list[dict]:
    frames = [f.removeprefix(b"data: ").decode() for f in b"".join(resp.response).split(b"\n\n") if f]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


def test_streamed_text_holds_back_what_could_still_become_a_stop_string(tiny_model_dir):
    with in_process(tiny_model_dir) as (client, manager):
        scripted(manager, SCRIPT)
        chunks = sse_data(client.post("/inference", json={"prompt": "x", "num_tokens": 4, "stop": STOP,
                                                          "stream": True}, buffered=False))
    assert "".join(c["text"] for c in chunks) == BEFORE_STOP
    assert chunks[-1]["finish_reason"] == "stop"


def test_tokens_cut_by_a_stop_string_are_not_counted_on_inference(tiny_model_dir):
    with in_process(tiny_model_dir) as (client, manager):
        scripted(manager, SCRIPT)
        body = client.post("/inference", json={"prompt": "x", "num_tokens": 4, "stop": STOP, "logprobs": 0}).json
    assert body["text"] == BEFORE_STOP and body["finish_reason"] == "stop"
    assert body["completion_tokens"] == 2  # "Say" and " hello": " world" only spells the stop string
    assert [t["token"] for t in body["logprobs"]] == SCRIPT[:2]


def test_tokens_cut_by_a_stop_string_are_not_counted_or_given_logprobs_on_v1(tiny_model_dir):
    with in_process(tiny_model_dir) as (client, manager):
        scripted(manager, SCRIPT)
        body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stop": STOP,
                                                    "logprobs": 0}).json
    [choice] = body["choices"]
    assert choice["text"] == BEFORE_STOP and body["usage"]["completion_tokens"] == 2
    assert choice["logprobs"]["tokens"] == ["Say", " hello"]


def test_streamed_logprobs_hold_back_the_tokens_of_a_possible_stop_string(tiny_model_dir):
    with in_process(tiny_model_dir) as (client, manager):
        scripted(manager, SCRIPT)
        *chunks, usage = sse_data(client.post("/v1/completions", json={
            "prompt": "x", "max_tokens": 4, "stop": STOP, "logprobs": 0, "stream": True,
            "stream_options": {"include_usage": True}}, buffered=False))
    texts = [c["choices"][0]["text"] for c in chunks]
    tokens = [c["choices"][0]["logprobs"]["tokens"] for c in chunks]
    assert "".join(texts) == BEFORE_STOP and sum(tokens, []) == ["Say", " hello"]
    sent_text, sent_tokens = "", []
    for text, chunk_tokens in zip(texts, tokens):  # a token goes out with the first of its text, not before
        sent_text, sent_tokens = sent_text + text, sent_tokens + chunk_tokens
        assert not sent_tokens or len("".join(sent_tokens[:-1])) < len(sent_text)
    assert usage["usage"]["completion_tokens"] == 2


def test_a_generated_end_of_text_is_not_counted_by_either_api(tiny_model_dir):
    for path, length in (("/inference", "num_tokens"), ("/v1/completions", "max_tokens")):
        with in_process(tiny_model_dir) as (client, manager):
            scripted(manager, SCRIPT[:2] + [EOT_TOKEN])
            body = client.post(path, json={"prompt": "x", length: 5, "ignore_eos": False}).json
        usage = body["usage"]["completion_tokens"] if "usage" in body else body["completion_tokens"]
        text = body["choices"][0]["text"] if "choices" in body else body["text"]
        assert (text, usage) == ("Say hello", 2), path


def test_v1_ignore_eos_generates_past_the_end_of_text(tiny_model_dir):
    with in_process(tiny_model_dir) as (client, manager):
        scripted(manager, [SCRIPT[0], EOT_TOKEN, SCRIPT[1]])
        body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "ignore_eos": True}).json
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
