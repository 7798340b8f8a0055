"""HTTP only: routes, request validation, auth and request ids; hands requests to the engine and waits or
streams (api/submission.py); knows no tensors.

Endpoints: POST /inference (the original API), POST /v1/completions and GET /v1/models (OpenAI's, see
api/completions.py), GET /stats, GET /metrics (Prometheus), GET /health, GET /timeline (the engine's schedule,
telemetry/timeline.py), POST /demo-burst (api/demo.py), GET|POST / (the live page, static/, for a browser; a hint
otherwise). Errors share one JSON shape (api/errors.py), unknown paths and methods included. The engine starts
inside the gunicorn worker (api/server.py).
"""
import hmac
import json
import logging
import math
import os
import re
import time
import uuid

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import MethodNotAllowed, NotFound, RequestEntityTooLarge

from api.completions import Completion, models_response, parse_completion_request
from api.demo import parse_burst, start_burst
from api.errors import ApiError, api_error
from api.server import draining, running, starting
from api.sse import sse_response
from api.submission import Submission
from api.validation import InvalidRequest, cache_salt, checked, number, reject_unknown, stop_strings, typed
from batching import Inference
from engine.params import SamplingParams
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


@app.errorhandler(RequestEntityTooLarge)
def body_too_large(e: RequestEntityTooLarge) -> Response:
    limit = running().settings.max_body_bytes
    return ApiError(413, f"the request body is larger than MAX_BODY_BYTES ({limit} bytes)",
                    code="body_too_large").response()


ENDPOINTS = ("POST /inference {\"prompt\": str, \"num_tokens\": int}; POST /v1/completions; GET /v1/models; "
             "GET /stats; GET /metrics; GET /health; GET /timeline; POST /demo-burst; GET / (the live page, in a "
             "browser)")


@app.errorhandler(NotFound)
def unknown_path(e: NotFound) -> Response:
    if request.path.rstrip("/") == "/v1/chat/completions":  # what OpenAI clients try first
        message = ("this server has no chat endpoint: GPT-2 is a plain language model, with no chat template. "
                   "Send the text to continue as 'prompt' to POST /v1/completions (client.completions.create)")
    else:
        path = request.path if len(request.path) <= 100 else request.path[:100] + "…"
        message = f"nothing is served at {path}; the endpoints: {ENDPOINTS}"
    return ApiError(404, message, code="not_found").response()


@app.errorhandler(MethodNotAllowed)
def wrong_method(e: MethodNotAllowed) -> Response:
    valid = sorted(e.valid_methods or [])
    takes = " or ".join(m for m in valid if m not in ("HEAD", "OPTIONS"))  # those Flask adds to every route
    return ApiError(405, f"{request.path} takes {takes}, not {request.method}", code="method_not_allowed",
                    headers={"Allow": ", ".join(valid)}).response()


OPEN_PATHS = ("/", "/health", "/metrics")
WORK_ENDPOINTS = ("inference", "completions", "demo_burst")  # they give the engine work: refused while draining
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces: safe in headers and logs


@app.before_request
def request_id_ready_and_key():
    given = request.headers.get("X-Request-Id", "")
    g.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request.max_content_length = 1 << 20  # until the settings say otherwise
    if request.endpoint == "metrics" and starting():
        return None  # open, and read from the workers' shared directory: a scrape must not fail on a new worker
    server = running()
    # A chunked body has no Content-Length to check up front, and werkzeug stops reading it at the limit without
    # a word: allow one byte more, so that json_body can tell a body over the limit from one that fits.
    limit = server.settings.max_body_bytes
    request.max_content_length = limit if request.content_length is not None else limit + 1
    open_path = request.path in OPEN_PATHS or request.endpoint == "static"  # the live page asks for the key itself
    if server.settings.key and not open_path and not key_matches(server.settings.key):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
                       code="invalid_api_key")
    if request.endpoint in WORK_ENDPOINTS and draining():  # the worker closes the connection after it: go elsewhere
        raise ApiError(503, "the server is shutting down and takes no new requests: send it to another server, or "
                            "again once this one has restarted", code="draining", headers={"Retry-After": "5"})


def key_matches(key: str) -> bool:
    """Either header may carry the key; a request is let in when one of those it sends is right, so a stray
    X-API-Key does not shadow a correct Bearer token. The scheme is case-insensitive (RFC 9110)."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    sent = [request.headers.get("X-API-Key"), token.strip() if scheme.lower() == "bearer" else None]
    return any(k is not None and hmac.compare_digest(k.encode(), key.encode()) for k in sent)


@app.after_request
def send_request_id(resp: Response) -> Response:
    resp.headers["X-Request-Id"] = g.get("request_id", "")
    return resp


def json_body() -> dict:
    """The request's JSON object. Only a body sent as application/json is read: a web page can make a browser
    POST text/plain or form bodies to any address without asking first, so accepting those would let any page
    a user has open drive a server on their machine."""
    if not request.is_json:
        raise ApiError(415, f"the body must be JSON sent with 'Content-Type: application/json'; got "
                            f"{request.mimetype or 'no Content-Type'}", code="unsupported_media_type")
    data = request.get_data()
    if len(data) > running().settings.max_body_bytes:  # a chunked body (see request_id_ready_and_key)
        raise RequestEntityTooLarge()
    try:
        body = json.loads(data)
    except RecursionError:
        raise InvalidRequest("the JSON body is nested too deeply", code="invalid_json") from None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body


def submit(infs: list[Inference], stream: bool, max_tokens_param: str) -> Submission:
    """Admit and enqueue a request's sequences; they are aborted if the client goes away (api/submission.py)."""
    return Submission(running().engine, infs, request.environ.get("gunicorn.socket"), stream, max_tokens_param)


# ---- the original API ----

INFERENCE_FIELDS = {"prompt", "num_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos",
                    "logprobs", "stream", "cache_salt"}


def parse_inference(body: dict) -> tuple[str, list[int], SamplingParams]:
    reject_unknown(body, INFERENCE_FIELDS)
    prompt = typed(body, "prompt", (str,), required=True)
    if not prompt:
        raise InvalidRequest("'prompt' must not be empty", "prompt")
    num_tokens = typed(body, "num_tokens", (int,), required=True)
    if num_tokens < 1:  # SamplingParams names it max_tokens; this API calls it num_tokens
        raise InvalidRequest(f"'num_tokens' must be at least 1; got {num_tokens}", "num_tokens")
    prompt_ids = encode(prompt)
    params = checked(SamplingParams(
        max_tokens=num_tokens,
        temperature=number(body, "temperature", default=1.0),
        top_k=typed(body, "top_k", (int,), default=0),
        top_p=number(body, "top_p", default=1.0),
        seed=typed(body, "seed", (int,)),
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
        resp = app.make_response(f"effective-batching: {ENDPOINTS}\n")
    resp.vary.add("Accept")
    return resp


@app.get("/health")
def health():
    server = running()
    m = server.engine
    stalled = time.monotonic() - m.last_step_time > server.settings.health_stall_s
    if m.fatal_error or not m.alive or stalled:  # fatal_error: the thread is dying, if not yet dead
        why = m.fatal_error or ("the engine is not running" if not m.alive else "the engine is stuck")
        raise ApiError(503, why, code="engine_unhealthy")
    if draining():  # a load balancer sends no more requests here
        raise ApiError(503, "the server is draining: it finishes the requests it has and takes no new ones",
                       code="draining")
    engines = m.load().get("per-engine", [])  # a Router's: the engine processes that serve now
    return jsonify({"status": "ok", "pid": os.getpid(), **server.info,  # pid: which worker answered
                    "engines-serving": len(engines), "engine-pids": [e["engine-pid"] for e in engines]})


@app.post("/inference")
def inference():
    body = json_body()
    prompt, prompt_ids, params = parse_inference(body)
    inf = Inference(prompt, prompt_ids, params, request_id=g.request_id, cache_salt=cache_salt(body))
    sub = submit([inf], typed(body, "stream", (bool,), default=False), "num_tokens")
    if inf.stream is not None:
        return sse_response(({"text": d.text, "finish_reason": d.finish_reason} for batch in sub.deltas()
                             for d in batch), sub.release)
    sub.wait()
    body = {"completion": inf.completion, "text": inf.text, "finish_reason": inf.finish_reason,
            "prompt_tokens": len(inf.prompt_ids), "cached_tokens": inf.cached_tokens,
            "completion_tokens": len(inf.output_ids),
            "ttft": inf.first_token_time - inf.arrival_time, "latency": inf.finish_time - inf.arrival_time}
    if params.logprobs is not None:
        body["logprobs"] = [{"token": t.token, "logprob": t.logprob, "top_logprobs": t.top_logprobs}
                            for t in inf.logprobs]
    return jsonify(body)


@app.get("/stats")
def stats():
    """Figures since start-up; with ?since=T (a `server-time` from an earlier /stats) over the requests that
    arrived since then: how a run measures itself on a server that served others before."""
    server = running()
    since = window_start()
    stats = server.engine.stats()
    stats.write_token_csv()
    return jsonify({**stats.snapshot(since), **server.engine.load(), **server.info})


def window_start() -> float | None:
    text = request.args.get("since")
    if text is None:
        return None
    try:
        since = float(text)
    except ValueError:
        since = math.nan
    if not math.isfinite(since):
        raise InvalidRequest(f"'since' must be a server-time from /stats; got {text[:40]!r}", "since")
    return since


@app.get("/timeline")
def timeline():
    """An engine's schedule (?engine=N, default 0, of the server's `engines`): steps and requests that changed
    after step `since` (all that is kept if absent)."""
    server = running()
    since, engine = request.args.get("since", "0"), request.args.get("engine", "0")
    if not re.fullmatch(r"[0-9]{1,18}", since):
        raise InvalidRequest(f"'since' must be a step number (an integer >= 0); got {since!r}", "since")
    if not re.fullmatch(r"[0-9]{1,4}", engine) or int(engine) >= server.info.get("engines", 1):
        raise InvalidRequest(f"'engine' must be an engine's number, 0 to {server.info.get('engines', 1) - 1}; "
                             f"got {engine!r}", "engine")
    return jsonify({**server.info, "pid": os.getpid(), **server.engine.timeline_since(int(since), int(engine))})


@app.post("/demo-burst")
def demo_burst():
    requests, wait = parse_burst(json_body())
    start_burst(running().engine, requests, wait)
    return jsonify({"requests": requests, "wait": wait}), 202


# ---- OpenAI's API ----

@app.get("/v1/models")
def models():
    server = running()
    return jsonify(models_response(server.model_name, server.started, server.engine.limits.max_context))


@app.post("/v1/completions")
def completions():
    server = running()
    req = parse_completion_request(json_body(), server.model_name, server.engine.limits.max_waiting)
    infs = req.inferences(g.request_id)
    sub = submit(infs, req.stream, "max_tokens")
    completion = Completion(req, infs, g.request_id)
    if req.stream:
        return sse_response(completion.chunks(sub.deltas()), sub.release)
    sub.wait()
    return jsonify(completion.response())


# ---- monitoring ----

@app.get("/metrics")
def metrics():
    if not starting():
        server = running()
        server.metrics.publish_load(server.engine.load())  # this worker's gauges exact at scrape time
    text, content_type = render()
    return Response(text, content_type=content_type)
