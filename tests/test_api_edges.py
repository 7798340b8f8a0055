"""Where a client first meets the API's edges, on a real server: unknown paths and methods, unknown fields, a
model the server does not serve, prompt lists that mix forms, and demo bursts that cannot be taken whole."""
import pytest
import requests

from conftest import running_server, wait_until

MODEL = "tiny-gpt2"
MAX_WAITING = 16


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, SERVED_MODEL_NAME=MODEL, MAX_WAITING=str(MAX_WAITING)) as url:
        yield url


def error_of(r: requests.Response, status: int) -> dict:
    """The error of a JSON error answer with this status."""
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# ---- paths and methods ----

def test_chat_completions_is_a_json_404_that_points_to_completions(server):
    r = requests.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}]}, timeout=10)
    err = error_of(r, 404)
    assert err["code"] == "not_found" and "no chat endpoint" in err["message"]
    assert "POST /v1/completions" in err["message"]


@pytest.mark.parametrize("method, path", [("get", "/nope"), ("post", "/v1/complete"), ("put", "/v1/models/x"),
                                          ("get", "/static/missing.js")])
def test_any_unknown_path_is_a_json_404_naming_it_and_the_endpoints(server, method, path):
    r = requests.request(method, server + path, headers={"Accept": "text/html"}, timeout=10)  # as a browser asks
    err = error_of(r, 404)
    assert err["code"] == "not_found" and f"nothing is served at {path};" in err["message"]
    assert "POST /v1/completions" in err["message"] and "POST /inference" in err["message"]


@pytest.mark.parametrize("method, path, allowed", [("get", "/inference", "POST"), ("delete", "/v1/completions", "POST"),
                                                   ("post", "/v1/models", "GET"), ("put", "/", "GET or POST")])
def test_a_wrong_method_is_a_json_405_saying_which_the_path_takes(server, method, path, allowed):
    r = requests.request(method, server + path, timeout=10)
    err = error_of(r, 405)
    assert err["code"] == "method_not_allowed"
    assert err["message"] == f"{path} takes {allowed}, not {method.upper()}"
    assert set(allowed.split(" or ")) <= set(r.headers["Allow"].split(", "))


# ---- fields ----

@pytest.mark.parametrize("path, body, name", [
    ("/inference", {"prompt": "hi", "num_tokens": 1, "max_tokens": 1}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "num_tokens": 1}, "num_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "extra": 1}},
     "extra"),
    ("/demo-burst", {"requests": 1, "gap": 1}, "gap"),
])
def test_an_unknown_field_is_named_once_in_quotes(server, path, body, name):
    err = error_of(requests.post(server + path, json=body, timeout=10), 400)
    assert err["code"] == "unknown_field" and err["param"] == name
    assert err["message"].startswith(f"unknown field '{name}'; accepted: ") and "''" not in err["message"]


def test_another_model_is_a_404_that_names_the_served_one(server):
    r = requests.post(server + "/v1/completions", json={"model": "gpt2-medium", "prompt": "hi"}, timeout=10)
    err = error_of(r, 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "`gpt2-medium` does not exist" in err["message"]
    assert f'"model": "{MODEL}"' in err["message"] and "GET /v1/models" in err["message"]
    assert requests.get(server + "/v1/models", timeout=10).json()["data"][0]["id"] == MODEL


@pytest.mark.parametrize("prompt", [[[64], "a"], ["a", [64]], ["a", 64], [64, "a"], [[64], 64], [64, [64]]])
def test_a_prompt_list_that_mixes_forms_is_refused(server, prompt):
    r = requests.post(server + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=10)
    err = error_of(r, 400)
    assert err["param"] == "prompt" and err["code"] == "invalid_type" and "not a mix" in err["message"]


def test_a_completion_without_a_prompt_says_it_is_required(server):
    err = error_of(requests.post(server + "/v1/completions", json={"max_tokens": 1}, timeout=10), 400)
    assert err["param"] == "prompt" and err["code"] == "missing_field" and err["message"] == "'prompt' is required"


@pytest.mark.parametrize("prompt, choices", [("a", 1), (["a", "b c"], 2), ([64, 275], 1), ([[64], [275, 66]], 2)])
def test_each_of_the_four_prompt_forms_is_taken(server, prompt, choices):
    r = requests.post(server + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == choices


# ---- the demo burst ----

def test_a_burst_the_queue_cannot_take_whole_is_refused_and_none_of_it_is_sent(server):
    before = requests.get(server + "/stats", timeout=10).json()["requests-finished"]
    r = requests.post(server + "/demo-burst", json={"requests": MAX_WAITING + 1, "wait": 0}, timeout=10)
    err = error_of(r, 503)
    assert err["code"] == "overloaded" and r.headers["Retry-After"]
    assert f"brings {MAX_WAITING + 1} requests" in err["message"] and f"MAX_WAITING is {MAX_WAITING}" in err["message"]
    stats = requests.get(server + "/stats", timeout=10).json()
    assert stats["waiting"] == stats["running"] == 0 and stats["requests-finished"] == before


def test_one_burst_at_a_time_and_the_next_once_it_is_sent(server):
    # 4 requests U(0,1) x 5 s apart: the burst is still being sent seconds later
    assert requests.post(server + "/demo-burst", json={"requests": 4, "wait": 5}, timeout=10).status_code == 202
    err = error_of(requests.post(server + "/demo-burst", json={"requests": 1, "wait": 0}, timeout=10), 409)
    assert err["code"] == "burst_in_progress" and "still being sent" in err["message"]
    wait_until(lambda: requests.post(server + "/demo-burst", json={"requests": 1, "wait": 0}, timeout=10)
               .status_code == 202, timeout=60)
