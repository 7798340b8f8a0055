"""HTTP only: routes, request validation, auth and request ids; hands requests to the engine and waits or
streams (api/submission.py); knows no tensors.

Endpoints: POST /inference (the original API), POST /v1/completions and GET /v1/models (OpenAI's, see
api/completions.py), GET /stats, GET /metrics (Prometheus), GET /health, GET /timeline (the engine's schedule,
telemetry/timeline.py), POST /demo-burst (api/demo.py), GET|POST / (the live page, static/, for a browser; a hint
otherwise). Errors share one JSON shape (api/errors.py). The engine starts inside the gunicorn worker
(api/server.py).
"""
import hmac
import logging
import os
import re
import time
import uuid

from flask import Flask, Response, g, jsonify, request

from api.completions import Completion, models_response, parse_completion_request
from api.demo import parse_burst, start_burst
from api.errors import ApiError, api_error
from api.server import running
from api.sse import sse_response
from api.submission import Submission
from api.validation import InvalidRequest, check_context_length, checked, reject_unknown, seed_value, stop_strings, \
    typed
from batching import Inference
from engine.sampler import SamplingParams
from engine.tokenizer import encode
from telemetry.prometheus import render

log = logging.getLogger("effective-batching")


app = Flask(__name__)


# ---- every request: errors, request id, auth ----

@app.errorhandler(Exception)
def handle_error(e: Exception) -> Response:
    err = api_error(e)
    if err.status >= 500:
        log.warning("%s: %d %s", g.get("request_id"), err.status, err.message)
    return err.response()


OPEN_PATHS = ("/", "/health", "/metrics")
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces: safe in headers and logs


@app.before_request
def request_id_ready_and_key():
    given = request.headers.get("X-Request-Id", "")
    g.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request.max_content_length = 1 << 20  # until the settings say otherwise
    server = running()
    request.max_content_length = server.settings.max_body_bytes
    key = server.settings.key
    if key and request.path not in OPEN_PATHS and request.endpoint != "static":  # the page asks for the key
        given = request.headers.get("X-API-Key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
                           code="invalid_api_key")


@app.after_request
def send_request_id(resp: Response) -> Response:
    resp.headers["X-Request-Id"] = g.get("request_id", "")
    return resp


def json_body() -> dict:
    body = request.get_json(force=True, silent=True)  # any Content-Type: `curl -d` sends form-urlencoded
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body


def submit(infs: list[Inference], stream: bool) -> Submission:
    """Enqueue a request's sequences; they are aborted if the client goes away (see api/submission.py)."""
    return Submission(running().manager, infs, request.environ.get("gunicorn.socket"), stream)


# ---- the original API ----

INFERENCE_FIELDS = {"prompt", "num_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos",
                    "logprobs", "stream"}


def parse_inference(body: dict) -> tuple[str, list[int], SamplingParams]:
    reject_unknown(body, INFERENCE_FIELDS)
    prompt = typed(body, "prompt", (str,), required=True)
    if not prompt:
        raise InvalidRequest("'prompt' must not be empty", "prompt")
    num_tokens = typed(body, "num_tokens", (int,), required=True)
    if num_tokens < 1:  # SamplingParams names it max_tokens; this API calls it num_tokens
        raise InvalidRequest(f"'num_tokens' must be at least 1; got {num_tokens}", "num_tokens")
    prompt_ids = encode(prompt)
    check_context_length(len(prompt_ids), num_tokens, running().manager.max_context, "num_tokens")
    params = checked(SamplingParams(
        max_tokens=num_tokens,
        temperature=float(typed(body, "temperature", (int, float), default=1.0)),
        top_k=typed(body, "top_k", (int,), default=0),
        top_p=float(typed(body, "top_p", (int, float), default=1.0)),
        seed=seed_value(body),
        stop=stop_strings(body),
        ignore_eos=typed(body, "ignore_eos", (bool,), default=True),
        logprobs=typed(body, "logprobs", (int,)),
    ))
    return prompt, prompt_ids, params


@app.route("/", methods=["GET", "POST"])
def hint():
    """The live page for a browser (it asks for text/html first); the one-line hint for everything else."""
    if request.method == "GET" and request.accept_mimetypes.best_match(["text/plain", "text/html"]) == "text/html":
        resp = app.send_static_file("index.html")
    else:
        resp = app.make_response("effective-batching: POST /inference {\"prompt\": str, \"num_tokens\": int}; "
                                 "POST /v1/completions; GET /v1/models; GET /stats; GET /metrics; GET /health; "
                                 "GET /timeline\n")
    resp.vary.add("Accept")
    return resp


@app.get("/health")
def health():
    server = running()
    m = server.manager
    stalled = time.monotonic() - m.last_step_time > server.settings.health_stall_s
    if not m.alive or stalled:
        why = m.fatal_error or ("the engine thread is not running" if not m.alive else "the engine is stuck")
        raise ApiError(503, why, code="engine_unhealthy")
    return jsonify({"status": "ok", "pid": os.getpid(), **server.info})  # pid: which worker answered


@app.post("/inference")
def inference():
    body = json_body()
    prompt, prompt_ids, params = parse_inference(body)
    inf = Inference(prompt, prompt_ids, params, request_id=g.request_id)
    sub = submit([inf], stream=typed(body, "stream", (bool,), default=False))
    if inf.stream is not None:
        return sse_response(({"text": d.text, "finish_reason": d.finish_reason} for batch in sub.deltas()
                             for d in batch), sub.release)
    sub.wait()
    body = {"completion": inf.completion, "text": inf.text, "finish_reason": inf.finish_reason,
            "prompt_tokens": len(inf.prompt_ids), "completion_tokens": len(inf.output_ids),
            "ttft": inf.first_token_time - inf.arrival_time, "latency": inf.finish_time - inf.arrival_time}
    if params.logprobs is not None:
        body["logprobs"] = [{"token": t.token, "logprob": t.logprob, "top_logprobs": t.top_logprobs}
                            for t in inf.logprobs]
    return jsonify(body)


@app.get("/stats")
def stats():
    server = running()
    server.stats.write_token_csv()
    return jsonify({**server.stats.snapshot(), **server.manager.load(), **server.info})


@app.get("/timeline")
def timeline():
    """The engine's schedule: steps and requests that changed after step `since` (all that is kept if absent)."""
    server = running()
    since = request.args.get("since", "0")
    if not re.fullmatch(r"[0-9]{1,18}", since):
        raise InvalidRequest(f"'since' must be a step number (an integer >= 0); got {since!r}", "since")
    return jsonify({**server.info, "pid": os.getpid(), **server.timeline.snapshot(int(since))})


@app.post("/demo-burst")
def demo_burst():
    requests, wait = parse_burst(json_body())
    start_burst(running().manager, requests, wait)
    return jsonify({"requests": requests, "wait": wait}), 202


# ---- OpenAI's API ----

@app.get("/v1/models")
def models():
    server = running()
    return jsonify(models_response(server.model_name, server.started, server.manager.max_context))


@app.post("/v1/completions")
def completions():
    server = running()
    req = parse_completion_request(json_body(), server.model_name, server.manager.max_context)
    infs = req.inferences(g.request_id)
    sub = submit(infs, req.stream)
    completion = Completion(req, infs, g.request_id)
    if req.stream:
        return sse_response(completion.chunks(sub.deltas()), sub.release)
    sub.wait()
    return jsonify(completion.response())


# ---- monitoring ----

@app.get("/metrics")
def metrics():
    server = running()
    server.metrics.publish_load(server.manager.load())  # this worker's gauges exact at scrape time
    text, content_type = render()
    return Response(text, content_type=content_type)
