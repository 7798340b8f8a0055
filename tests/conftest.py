"""Shared fixtures: a tiny random GPT-2 saved in HF format, engines built on it, and real gunicorn servers.

Servers started by the tests inherit none of the developer's server settings (WORKERS, MAX_BATCH,
PROMETHEUS_MULTIPROC_DIR, ...) and write their data into a temporary DATA_DIR, never into the checkout.
"""
import contextlib
import dataclasses
import json
import os
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
import requests
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def patch_interpreter() -> None:
    """Two gaps of Triton 3.6's interpreter that the compiled kernels do not have:
    - it turns a 1-element array into a loop bound with int(), which NumPy >= 2.4 refuses (triton-lang/triton#9171),
      so every loop up to a length read from memory fails: index through .item();
    - tl.dot multiplies bfloat16's raw uint16 bit patterns (triton-lang/triton#11584): widen them to float32."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def patch_lang_tensor(tensor, scope, original=interpreter._patch_lang_tensor):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    def as_float32(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, *args, original=interpreter.InterpreterBuilder.create_dot):
        return original(self, as_float32(a), as_float32(b), *args)

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = create_dot


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run on this CPU, slowly, for tests
    with contextlib.suppress(ImportError):
        patch_interpreter()

from engine.config import Settings  # noqa: E402

# Every environment variable ./server.sh and gunicorn_conf.py read: gone before anything (prometheus_client
# included) reads one, for this process and every server it starts.
SERVER_VARIABLES = {f.name.upper() for f in dataclasses.fields(Settings)} | {
    "HOST", "PORT", "THREADS", "WORKERS", "WORKER_TIMEOUT", "LOG_LEVEL", "ACCESS_LOG", "PROMETHEUS_MULTIPROC_DIR",
    "CLIENT_TIMEOUT_S", "GUNICORN_CONF", "PIN_WORKERS", "GRACEFUL_TIMEOUT_S", "KEEPALIVE_S",
    "EFFECTIVE_BATCHING_METRICS_DIR"}
for name in SERVER_VARIABLES:
    os.environ.pop(name, None)

import api.server  # noqa: E402
import app  # noqa: E402
from batching import BatchingManager, Inference, make_policy  # noqa: E402
from engine.loader import from_pretrained  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from engine.params import SampledToken, SamplingParams  # noqa: E402
from client import server_process  # noqa: E402
from telemetry.stats import ServerStats  # noqa: E402
from telemetry.timeline import Timeline  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def temporary_data_dir(tmp_path_factory):
    """Where servers started by the tests write /stats' CSV (DATA_DIR)."""
    os.environ["DATA_DIR"] = str(tmp_path_factory.mktemp("data"))


TINY = dict(n_layer=2, n_head=2, n_embd=64, n_positions=1024, vocab_size=50257)


def make_hf_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    # a wide init makes the random model's greedy choices varied and far from ties
    config = GPT2Config(**TINY, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_hf_model():
    return make_hf_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_hf_model) -> str:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_hf_model.save_pretrained(path)
    return str(path)


def make_manager(model_dir: str, policy: str = "dynamic", max_batch: int = 8, num_blocks: int = 256,
                 block_size: int = 4, max_step_tokens: int = 256, max_waiting: int = 1024,
                 attention: str = "reference", **kw) -> BatchingManager:
    """An engine on the CPU in fp32 (attention="triton": the GPU kernels, interpreted); tests drive it with
    step() or start its thread."""
    runner = ModelRunner(from_pretrained(model_dir), torch.device("cpu"), torch.float32, block_size=block_size,
                         num_blocks=num_blocks, seed=0, attention=attention)
    return BatchingManager(runner, make_policy(policy, max_batch), max_step_tokens, max_waiting, **kw)


def request(prompt_ids: list[int], max_tokens: int, **params) -> Inference:
    params.setdefault("temperature", 0)
    return Inference("", prompt_ids, SamplingParams(max_tokens=max_tokens, **params))


def run_until_idle(manager: BatchingManager, max_steps: int = 10_000) -> int:
    """Step the engine on this thread until nothing is left; returns the number of steps."""
    for n in range(max_steps):
        if not manager.step():
            return n
    raise AssertionError("engine did not become idle")


def fail_step(manager: BatchingManager, step: int, message: str) -> None:
    """Make the manager's `step`-th forward (1-based) from now on raise RuntimeError(message), once."""
    launch, calls = manager.runner.launch, []

    def failing_launch(plan):
        calls.append(plan)
        if len(calls) == step:
            raise RuntimeError(message)
        return launch(plan)

    manager.runner.launch = failing_launch


@pytest.fixture(autouse=True)
def engine_invariants(monkeypatch):
    """Every BatchingManager a test makes checks its bookkeeping after every step (check_invariants: KV blocks and
    table rows free or held by exactly one running sequence, queues disjoint, no sequence finished twice), and
    once the test is over, stopped, holds no blocks and no sequences, and has finished every request it took."""
    managers: list[tuple[BatchingManager, list[Inference]]] = []
    init = BatchingManager.__init__

    def checked_init(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "check_invariants": True})
        taken: list[Inference] = []
        enqueue = self.enqueue

        def recorded_enqueue(inf: Inference) -> Inference:
            taken.append(enqueue(inf))
            return inf

        self.enqueue = recorded_enqueue
        managers.append((self, taken))

    monkeypatch.setattr(BatchingManager, "__init__", checked_init)
    yield
    for manager, taken in managers:
        manager.stop()  # aborts what a test left in flight, as a server's shutdown does
        manager.check_invariants()
        assert_nothing_leaked(manager)
        unfinished = [inf.id for inf in taken if not inf.done or inf.id not in manager._finished_ids]
        assert not unfinished, f"requests {unfinished} were taken and never finished"


def assert_nothing_leaked(manager: BatchingManager) -> None:
    bm, s = manager.runner.block_manager, manager.scheduler
    assert bm.num_free == bm.num_blocks, "KV blocks leaked"
    assert not bm.tables
    assert not s.running and not s.waiting and not s.preempted


@contextlib.contextmanager
def in_process(model_dir: str, **settings):
    """The app in this process (Flask's test client) over an engine of the tiny model; yields (client, manager)."""
    manager = make_manager(model_dir)
    settings.setdefault("data_dir", os.environ["DATA_DIR"])
    s = Settings(served_model_name="tiny-gpt2", **settings)
    manager.attach_stats(ServerStats(s.policy, s.data_dir))
    manager.attach_timeline(Timeline())
    api.server.serve(s, manager, {})
    try:
        yield app.app.test_client(), manager
    finally:
        manager.stop()
        api.server.current = None


def scripted(manager: BatchingManager, tokens: list[int]) -> None:
    """The model 'samples' `tokens` in order, whatever the prompt."""
    script = iter(tokens)
    manager.runner.launch = lambda plan: Sampled({seq.id: SampledToken(next(script)) for seq, n in plan
                                                  if seq.num_computed + n == len(seq.token_ids) + seq.num_pending})


@dataclasses.dataclass
class Sampled:
    """A launched step whose tokens are known already (a scripted model's)."""
    tokens: dict[int, SampledToken]

    @property
    def ids(self) -> list[int]:
        return list(self.tokens)

    def wait(self) -> dict[int, SampledToken]:
        return self.tokens


# ---- real servers ----

@contextlib.contextmanager
def running_server(policy: str, model_dir: str, key: str | None = None, timeout: float = 90, **env):
    """`./server.sh POLICY [KEY]` on a free localhost port, serving the tiny model on the CPU; yields its URL."""
    settings = {"MODEL": model_dir, "WEIGHTS": "pretrained", "DEVICE": "cpu", "THREADS": "64", "KV_CACHE_GB": "0.2",
                "CHECK_INVARIANTS": "true", **env}
    with tempfile.TemporaryDirectory() as directory:
        log_path = os.path.join(directory, "server.log")
        with server_process.running_server(policy, settings, key, log_path, timeout=timeout) as (url, _):
            # healthy is one worker serving; the others start within moments (a worker answers 503 "starting"
            # until it reaches its engines), and tests may ask any of them
            wait_until(lambda: all(requests.get(url + "/health", timeout=30).status_code == 200 for _ in range(8)))
            yield url
        with open(log_path) as log:
            text = log.read()
        assert "AssertionError" not in text, f"the engine broke an invariant; its log ends:\n{text[-3000:]}"


# ---- a stand-in server ----

@contextlib.contextmanager
def json_server(answer):
    """A local HTTP server whose POSTs are answered by `answer(headers, body) -> (status, payload)` as JSON;
    yields its URL."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload = answer(self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# ---- watching a real server ----

def open_request(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket and return without reading, so the test decides when the client leaves."""
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> None:
    received = b""
    while marker not in received:
        piece = sock.recv(65536)
        assert piece, "the server closed the connection"
        received += piece


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def server_stats(url: str) -> dict:
    return requests.get(url + "/stats").json()


def idle_with_every_block_free(url: str) -> bool:
    s = server_stats(url)
    return s["running"] == 0 and s["waiting"] == 0 and s["kv-blocks-free"] == s["kv-blocks-total"]


def still_serves(url: str) -> bool:
    r = requests.post(url + "/v1/completions", json={"prompt": "still there?", "max_tokens": 3})
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
