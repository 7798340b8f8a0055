"""HTTP only: routes, request validation, auth and request ids; hands requests to the engine and waits or
streams (engine_client.py); knows no tensors.

Endpoints: POST /inference (the original API), POST /v1/completions and GET /v1/models (OpenAI's, see
openai_api.py), GET /stats, GET /metrics (Prometheus), GET /health, GET|POST / (a hint). Errors share one
JSON shape (errors.py). The engine starts inside the gunicorn worker (`gunicorn_conf.post_worker_init` calls
`start_engine`), never in the master process: CUDA and threads do not survive a fork.
"""
import hmac
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field

from flask import Flask, Response, g, jsonify, request

from batching import BatchingManager, Inference, make_policy
from engine_client import Submission
from errors import ApiError, api_error
from openai_api import Completion, models_response, parse_completion_request
from prometheus_metrics import EngineMetrics, render
from sampling import InvalidRequest, SamplingParams
from sse import sse_response
from stats import ServerStats
from tokenizer import encode
from validation import check_context_length, reject_unknown, seed_value, stop_strings, typed

log = logging.getLogger("effective-batching")


@dataclass
class Settings:
    """Server configuration, from environment variables (see README)."""
    policy: str = "dynamic"
    model: str = "gpt2-medium"
    served_model_name: str | None = None  # the model id of /v1; MODEL when unset
    weights: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 128
    max_step_tokens: int = 2048
    max_waiting: int = 1024
    kv_cache_gb: float = 2.0  # CPU; on a GPU the cache takes what GPU_MEMORY_UTILIZATION leaves
    kv_blocks: int | None = None  # exact pool size, overrides the two above
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    key: str | None = None
    seed: int | None = None
    data_dir: str = "data"
    max_body_bytes: int = 1 << 20
    health_stall_s: float = 120.0

    @classmethod
    def from_env(cls, env: dict = os.environ) -> "Settings":
        s = cls()
        for f in s.__dataclass_fields__.values():
            raw = env.get(f.name.upper())
            if raw in (None, ""):
                continue
            kind = type(f.default) if f.default is not None else (int if f.name in ("kv_blocks", "seed") else str)
            setattr(s, f.name, kind(raw))
        return s


@dataclass
class Server:
    settings: Settings
    manager: BatchingManager
    stats: ServerStats
    metrics: EngineMetrics
    info: dict = field(default_factory=dict)
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or self.settings.model


server: Server | None = None
app = Flask(__name__)


def start_engine(settings: Settings | None = None) -> Server:
    """Load the model, build the engine and start its thread (once per worker process)."""
    if server is not None:
        return server
    import torch
    from model import load_model
    from runner import ModelRunner, resolve_device, resolve_dtype
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = settings or Settings.from_env()
    policy = make_policy(s.policy, s.max_batch)
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    t0 = time.perf_counter()
    model, weights = load_model(s.model, s.weights)
    runner = ModelRunner(model, device, dtype, block_size=s.block_size, num_blocks=s.kv_blocks,
                         kv_cache_gb=s.kv_cache_gb, gpu_memory_utilization=s.gpu_memory_utilization, seed=s.seed)
    manager = BatchingManager(runner, policy, s.max_step_tokens, s.max_waiting)
    info = {"policy": s.policy, "model": s.model, "weights": weights,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "max-batch": s.max_batch,
            "max-context": model.config.block_size}
    if weights == "random":
        info["warning"] = "random weights: completions are meaningless text"
    serve(s, manager, info)
    log.info("serving %s (%s weights) on %s in %s with policy %s; loaded in %.1f s", s.model, weights,
             info["device"], info["dtype"], s.policy, time.perf_counter() - t0)
    return server


def serve(settings: Settings, manager: BatchingManager, info: dict) -> Server:
    """Attach statistics and metrics to an engine, start its thread and route requests to it."""
    global server
    stats = ServerStats(settings.policy, settings.data_dir)
    metrics = EngineMetrics(settings.served_model_name or settings.model, settings.policy)
    manager.on_finish += [stats.record, metrics.record]
    manager.start()
    metrics.start_publisher(manager)
    server = Server(settings, manager, stats, metrics, info)
    return server


def stop_engine() -> None:
    if server is not None:
        server.manager.stop()


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
    request.max_content_length = server.settings.max_body_bytes if server else 1 << 20
    if server is None:
        raise ApiError(503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"})
    key = server.settings.key
    if key and request.path not in OPEN_PATHS:
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
    """Enqueue a request's sequences; they are aborted if the client goes away (see engine_client.py)."""
    return Submission(server.manager, infs, request.environ.get("gunicorn.socket"), stream)


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
    check_context_length(len(prompt_ids), num_tokens, server.manager.max_context, "num_tokens")
    params = SamplingParams(
        max_tokens=num_tokens,
        temperature=float(typed(body, "temperature", (int, float), default=1.0)),
        top_k=typed(body, "top_k", (int,), default=0),
        top_p=float(typed(body, "top_p", (int, float), default=1.0)),
        seed=seed_value(body),
        stop=stop_strings(body),
        ignore_eos=typed(body, "ignore_eos", (bool,), default=True),
        logprobs=typed(body, "logprobs", (int,)),
    )
    return prompt, prompt_ids, params


@app.route("/", methods=["GET", "POST"])
def hint():
    return ("effective-batching: POST /inference {\"prompt\": str, \"num_tokens\": int}; POST /v1/completions; "
            "GET /v1/models; GET /stats; GET /metrics; GET /health\n")


@app.get("/health")
def health():
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
    server.stats.write_token_csv()
    return jsonify({**server.stats.snapshot(), **server.manager.load(), **server.info})


# ---- OpenAI's API ----

@app.get("/v1/models")
def models():
    return jsonify(models_response(server.model_name, server.started, server.manager.max_context))


@app.post("/v1/completions")
def completions():
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
    server.metrics.publish_load(server.manager.load())  # this worker's gauges exact at scrape time
    text, content_type = render()
    return Response(text, content_type=content_type)
