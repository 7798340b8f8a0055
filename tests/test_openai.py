"""/v1 against the official `openai` client, on a real gunicorn server with an API key."""
import openai
import pytest
import requests

from conftest import running_server

KEY = "sk-test"
MODEL = "tiny-gpt2"


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, key=KEY, SERVED_MODEL_NAME=MODEL) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def complete(client, **kw):
    kw.setdefault("model", MODEL)
    return client.completions.create(**kw)


def test_completion_has_openai_shape_and_usage(client):
    c = complete(client, prompt="Hello there", max_tokens=7, temperature=0)
    assert c.object == "text_completion" and c.model == MODEL and c.id.startswith("cmpl-")
    [choice] = c.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert c.usage.prompt_tokens == 2 and c.usage.completion_tokens == 7 and c.usage.total_tokens == 9


def test_max_tokens_defaults_to_16(client):
    assert complete(client, prompt="Hi", temperature=0).usage.completion_tokens == 16


def test_every_prompt_form_gives_its_choices_in_order(client):
    greedy = dict(max_tokens=4, temperature=0)
    one = [complete(client, prompt=p, **greedy).choices[0].text for p in ("a b", "c")]
    assert [ch.text for ch in complete(client, prompt=["a b", "c"], **greedy).choices] == one
    ids = [64, 275]  # "a b"
    assert complete(client, prompt=ids, **greedy).choices[0].text == one[0]
    batch = complete(client, prompt=[ids, [66]], **greedy)  # [66] is "c"
    assert [ch.text for ch in batch.choices] == one and [ch.index for ch in batch.choices] == [0, 1]
    assert batch.usage.prompt_tokens == 3


def test_n_samples_differ_and_a_seed_makes_them_reproducible(client):
    kw = dict(prompt="Once upon a time", max_tokens=12, n=3, seed=7, temperature=1.0)
    first, again = complete(client, **kw), complete(client, **kw)
    texts = [ch.text for ch in first.choices]
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert [ch.text for ch in again.choices] == texts
    assert first.usage.completion_tokens == 36 and first.usage.prompt_tokens == 4
    assert complete(client, **{**kw, "seed": 8}).choices[0].text != texts[0]


def test_streaming_with_usage_gives_the_same_text_as_a_plain_request(client):
    kw = dict(prompt=["The sky", "Grass"], max_tokens=20, n=2, seed=3, temperature=1.0)
    plain = complete(client, **kw)
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}, **kw))
    *text_chunks, usage_chunk = chunks
    streamed = ["", "", "", ""]
    for chunk in text_chunks:
        [choice] = chunk.choices
        streamed[choice.index] += choice.text
        assert chunk.usage is None
    assert streamed == [ch.text for ch in plain.choices]
    assert len(text_chunks) > 4  # incremental, not one chunk per choice
    finished = [ch.choices[0].finish_reason for ch in text_chunks if ch.choices[0].finish_reason]
    assert finished == ["length"] * 4
    assert usage_chunk.choices == [] and usage_chunk.usage == plain.usage


def test_streaming_without_include_usage_sends_no_usage(client):
    chunks = list(complete(client, prompt="x", max_tokens=3, stream=True))
    assert chunks and all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_stop_string_cuts_the_text_before_it(client):
    full = complete(client, prompt="Stop here", max_tokens=20, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    c = complete(client, prompt="Stop here", max_tokens=20, temperature=0, stop=[stop, "never-in-text"])
    assert c.choices[0].text == full[:full.index(stop)]
    assert c.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in complete(client, prompt="Stop here", max_tokens=20,
                                                              temperature=0, stop=stop, stream=True))
    assert streamed == c.choices[0].text


def test_logprobs_report_each_token_with_its_top_alternatives(client):
    c = complete(client, prompt="Numbers:", max_tokens=6, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert top[token] == logprob == max(top.values())  # greedy picks the most likely token
    streamed = [ch.choices[0].logprobs for ch in complete(client, prompt="Numbers:", max_tokens=6, temperature=0,
                                                            logprobs=3, stream=True)]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_echo_prepends_the_prompt(client):
    plain = complete(client, prompt="Echo me", max_tokens=5, temperature=0).choices[0].text
    assert complete(client, prompt="Echo me", max_tokens=5, temperature=0, echo=True).choices[0].text == \
        "Echo me" + plain
    streamed = complete(client, prompt="Echo me", max_tokens=5, temperature=0, echo=True, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == "Echo me" + plain


def test_models_lists_the_served_model(client):
    [model] = client.models.list().data
    assert model.id == MODEL and model.owned_by == "effective-batching"
    assert model.model_extra["max_model_len"] == 1024


@pytest.mark.parametrize("kw, param", [
    (dict(max_tokens=2000), "max_tokens"),
    (dict(prompt=[1] * 1024), "prompt"),
    (dict(temperature=2.5), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(logprobs=6), "logprobs"),
    (dict(echo=True, logprobs=1), "echo"),
    (dict(best_of=2), "best_of"),
    (dict(suffix="!"), "suffix"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=1), "frequency_penalty"),
    (dict(logit_bias={"50256": -100}), "logit_bias"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[50257]), "prompt"),
    (dict(prompt=[[64], "a"]), "prompt"),  # the four prompt forms do not mix
    (dict(prompt=["a", [64]]), "prompt"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(extra_body={"repetition_penalty": 1.2}), "repetition_penalty"),
])
def test_invalid_or_unsupported_fields_raise_bad_request_naming_the_field(client, kw, param):
    kw = {"prompt": "x", **kw}
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_context_length_error_says_how_long_the_request_is(client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, prompt=[1] * 1000, max_tokens=100)
    assert "maximum context length is 1024 tokens" in e.value.message
    assert "you requested 1100 tokens (1000 in the prompt, 100 in the completion)" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, prompt=[1] * 1500)
    assert "your request has 1500 input tokens" in e.value.message


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert f'serves `{MODEL}`: pass "model": "{MODEL}"' in e.value.message


def test_chat_completions_raises_not_found_pointing_to_completions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "not_found" and "POST /v1/completions" in e.value.message


def test_wrong_key_raises_authentication_error(url):
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x")


def test_vllm_top_k_reaches_the_sampler(client):
    """top_k=1 leaves one token to draw from: temperature 1 gives the greedy text (ignore_eos: test_stop_and_eos)."""
    greedy = complete(client, prompt="Once upon", max_tokens=12, temperature=0).choices[0].text
    for seed in (1, 2):
        c = complete(client, prompt="Once upon", max_tokens=12, temperature=1.0, seed=seed, extra_body={"top_k": 1})
        assert c.choices[0].text == greedy
    assert complete(client, prompt="Once upon", max_tokens=12, temperature=1.0, seed=1).choices[0].text != greedy


def test_prompts_times_n_over_the_queue_are_refused_before_anything_runs(url, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    before = requests.get(url + "/stats", headers=auth).json()["finish-reasons"]
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, prompt=["x"] * 4000, n=128, max_tokens=1)
    assert e.value.body["code"] == "too_many_sequences" and "512000 sequences" in e.value.message
    assert requests.get(url + "/stats", headers=auth).json()["finish-reasons"] == before  # no aborts counted


def test_every_error_has_one_shape(url):
    auth = {"Authorization": f"Bearer {KEY}"}
    as_json = {**auth, "Content-Type": "application/json"}
    responses = [
        requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": "many"}, headers=auth),  # 400
        requests.post(url + "/v1/completions", json={"prompt": "x"}),  # 401
        requests.get(url + "/v1/nothing-here", headers=auth),  # 404
        requests.get(url + "/v1/completions", headers=auth),  # 405
        requests.post(url + "/v1/completions", data=b"{" + b" " * (2 << 20) + b"}", headers=as_json),  # 413
        requests.post(url + "/inference", data="not json", headers=as_json),  # 400
        requests.post(url + "/inference", data='{"prompt": "x", "num_tokens": 1}', headers=auth),  # 415
    ]
    assert [r.status_code for r in responses] == [400, 401, 404, 405, 413, 400, 415]
    for r in responses:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert responses[0].json()["error"]["param"] == "max_tokens"


def test_request_id_is_returned_and_generated_when_missing(url):
    auth = {"Authorization": f"Bearer {KEY}"}
    given = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                          headers={**auth, "X-Request-Id": "my-id-1"})
    assert given.headers["X-Request-Id"] == "my-id-1" and given.json()["id"] == "cmpl-my-id-1"
    generated = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=auth)
    other = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=auth)
    assert generated.headers["X-Request-Id"] != other.headers["X-Request-Id"]
    assert requests.get(url + "/health").headers["X-Request-Id"]


def test_original_inference_api_is_unchanged(url):
    r = requests.post(url + "/inference", json={"prompt": "Request 1", "num_tokens": 5},
                      headers={"X-API-Key": KEY})
    body = r.json()
    assert r.status_code == 200 and body["completion"] == "Request 1" + body["text"]
    assert body["completion_tokens"] == 5 and body["finish_reason"] == "length"
