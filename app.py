"""HTTP only: validates requests, hands them to the engine and waits; knows no tensors.

Endpoints: POST /inference, GET /stats, GET /health, GET|POST / (a hint). Errors share one JSON shape,
`{"error": {"message", "type", "param", "code"}}`. The engine starts inside the gunicorn worker
(`gunicorn_conf.post_worker_init` calls `start_engine`), never in the master process: CUDA and threads do
not survive a fork.
"""
import hmac
import logging
import os
import time
from dataclasses import dataclass, field

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from batching import BatchingManager, Inference, Overloaded, make_policy
from sampling import InvalidRequest, SamplingParams
from stats import ServerStats
from tokenizer import encode

log = logging.getLogger("effective-batching")


@dataclass
class Settings:
    """Server configuration, from environment variables (see README)."""
    policy: str = "dynamic"
    model: str = "gpt2-medium"
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
    info: dict = field(default_factory=dict)


server: Server | None = None
app = Flask(__name__)


def start_engine(settings: Settings | None = None) -> Server:
    """Load the model, build the engine and start its thread (once per worker process)."""
    global server
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
    stats = ServerStats(s.policy, s.data_dir)
    manager = BatchingManager(runner, policy, s.max_step_tokens, s.max_waiting, on_finish=[stats.record])
    info = {"policy": s.policy, "model": s.model, "weights": weights,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "max-batch": s.max_batch,
            "max-context": model.config.block_size}
    if weights == "random":
        info["warning"] = "random weights: completions are meaningless text"
    manager.start()
    server = Server(s, manager, stats, info)
    log.info("serving %s (%s weights) on %s in %s with policy %s; loaded in %.1f s", s.model, weights,
             info["device"], info["dtype"], s.policy, time.perf_counter() - t0)
    return server


def stop_engine() -> None:
    if server is not None:
        server.manager.stop()


# ---- errors ----

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded",
               500: "internal_server_error"}


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> Response:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}
    resp = jsonify(body)
    resp.status_code = status
    resp.headers.update(headers or {})
    return resp


@app.errorhandler(HTTPException)
def http_error(e: HTTPException) -> Response:
    return error(e.code or 500, e.description or e.name)


@app.errorhandler(InvalidRequest)
def invalid_request(e: InvalidRequest) -> Response:
    return error(400, str(e), e.param, e.code)


@app.errorhandler(Overloaded)
def overloaded(e: Overloaded) -> Response:
    return error(503, str(e), code="overloaded", headers={"Retry-After": "1"})


@app.errorhandler(Exception)
def internal(e: Exception) -> Response:
    log.exception("unhandled error")
    return error(500, f"internal error: {e!r}")


OPEN_PATHS = ("/", "/health")


@app.before_request
def check_ready_and_key():
    request.max_content_length = server.settings.max_body_bytes if server else 1 << 20
    if server is None:
        return error(503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"})
    key = server.settings.key
    if key and request.path not in OPEN_PATHS:
        given = request.headers.get("X-API-Key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), key.encode()):
            return error(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
                         code="invalid_api_key")


# ---- request parsing ----

def json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body


def typed(body: dict, name: str, types: tuple, required: bool = False, default=None):
    """body[name] if it has one of `types` (bool never counts as a number)."""
    if name not in body:
        if required:
            raise InvalidRequest(f"'{name}' is required", name, "missing_field")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise InvalidRequest(f"'{name}' must be {names}; got {value!r}", name, "invalid_type")
    return value


INFERENCE_FIELDS = {"prompt", "num_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos",
                    "logprobs"}


def parse_inference(body: dict) -> tuple[str, list[int], SamplingParams]:
    unknown = sorted(set(body) - INFERENCE_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field '{unknown[0]}'; accepted: {', '.join(sorted(INFERENCE_FIELDS))}",
                             unknown[0], "unknown_field")
    prompt = typed(body, "prompt", (str,), required=True)
    if not prompt:
        raise InvalidRequest("'prompt' must not be empty", "prompt")
    num_tokens = typed(body, "num_tokens", (int,), required=True)
    if num_tokens < 1:
        raise InvalidRequest(f"'num_tokens' must be at least 1; got {num_tokens}", "num_tokens")
    stop = typed(body, "stop", (str, list), default=[])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("'stop' must be a string or a list of strings", "stop", "invalid_type")
    params = SamplingParams(
        max_tokens=num_tokens,
        temperature=float(typed(body, "temperature", (int, float), default=1.0)),
        top_k=typed(body, "top_k", (int,), default=0),
        top_p=float(typed(body, "top_p", (int, float), default=1.0)),
        seed=typed(body, "seed", (int,)),
        stop=stop,
        ignore_eos=typed(body, "ignore_eos", (bool,), default=True),
        logprobs=typed(body, "logprobs", (int,)),
    )
    return prompt, encode(prompt), params


# ---- endpoints ----

@app.route("/", methods=["GET", "POST"])
def hint():
    return "effective-batching: POST /inference {\"prompt\": str, \"num_tokens\": int}; GET /stats; GET /health\n"


@app.get("/health")
def health():
    m = server.manager
    stalled = time.monotonic() - m.last_step_time > server.settings.health_stall_s
    if not m.alive or stalled:
        why = m.fatal_error or ("the engine thread is not running" if not m.alive else "the engine is stuck")
        return error(503, why, code="engine_unhealthy")
    return jsonify({"status": "ok", **server.info})


@app.post("/inference")
def inference():
    prompt, prompt_ids, params = parse_inference(json_body())
    inf = server.manager.enqueue(Inference(prompt, prompt_ids, params))
    inf.event.wait()
    if inf.finish_reason == "error":
        return error(500, inf.error or "inference failed", code="inference_failed")
    if inf.finish_reason == "abort":
        return error(503, inf.error or "the request was aborted", code="aborted")
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
