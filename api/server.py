"""The serving state of a gunicorn worker: settings, the engines it feeds (processes of their own, one per GPU,
shared by every worker: serving/), metrics, and the drain when it is told to stop.

gunicorn's master starts the engine processes (`start_engines`, from gunicorn_conf.when_ready) before it forks the
workers, and restarts one that dies (serving/master.py). Each worker connects to every engine, as they come to
serve, through a router (`start_engine_soon`, from post_worker_init) that sends each request to the least busy
engine and reconnects to an engine that comes back; until then it answers 503 "starting". A worker never touches
CUDA, nor does the master: neither imports torch. The routes read the worker's state through `running()`. The HTTP
side is typed against serving.protocol.Engine: the router here, a BatchingManager in one process (tests).

A worker told to stop drains (gunicorn_conf.ServingThreadWorker calls `start_draining`): new work is refused with
a 503 at once, and requests still running at the drain's deadline are ended with an error (api/submission.py).
"""
import gc
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from api.errors import ApiError
from batching import make_policy
from engine.config import Settings
from engine.tokenizer import get_tokenizer
from serving.master import Engines, EngineStartFailed
from serving.protocol import Engine
from serving.router import Router
from telemetry.prometheus import EngineMetrics

log = logging.getLogger("effective-batching")

GIL_SWITCH_S = 0.0005


class StartupFailed(RuntimeError):
    """The server cannot start serving (the master its engines, or a worker its connections to them); the
    message says what failed and what to do, in one line."""


@dataclass
class Server:
    settings: Settings
    engine: Engine
    metrics: EngineMetrics
    info: dict = field(default_factory=dict)
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or self.settings.model


current: Server | None = None


def starting() -> bool:
    """This worker has not reached its engines yet."""
    return current is None


def running() -> Server:
    if current is None:
        raise ApiError(503, "starting: the engines are loading the model (GET /health answers 200 once they serve)",
                       code="starting", headers={"Retry-After": "5"})
    return current


drain_deadline: float | None = None  # time.monotonic() by which what still runs is ended; None: not draining


def start_draining(deadline: float) -> None:
    """This worker is stopping: take no new work from now on, and end the requests still running at `deadline`.
    Called from a signal handler: it sets a value and nothing more."""
    global drain_deadline
    drain_deadline = deadline


def draining() -> bool:
    return drain_deadline is not None


def drain_expired() -> bool:
    return drain_deadline is not None and time.monotonic() >= drain_deadline


engines: Engines | None = None  # the engines this process started; a forked worker inherits the handles
startup_error: str | None = None  # why the engines could not start: the master then exits with status 3


def start_engines(settings: Settings | None = None) -> Engines:
    """Start the engine processes, which load the model side by side (`wait_for_engines` waits for them): in
    gunicorn's master, before it forks the workers, which answer 503 "starting" until the engines serve."""
    global engines
    s = settings or Settings.from_env()
    try:
        make_policy(s.policy)  # an unknown policy fails here, before a model loads
        engines = Engines(s)
    except Exception as e:
        raise StartupFailed(startup_failure(s, e)) from e
    return engines


def wait_for_engines() -> None:
    """Wait until every engine serves, then watch them (a dead one is started again)."""
    global startup_error
    try:
        engines.wait_ready()
    except Exception as e:
        startup_error = startup_failure(engines.settings, e)
        raise StartupFailed(startup_error) from e
    engines.watch()


def stop_engines() -> None:
    if engines is not None and engines.owner == os.getpid():
        engines.stop()


def start_engine_soon() -> None:
    """`start_engine` in a thread of its own: the worker answers (503 "starting") while its engines load."""
    def start() -> None:
        try:
            start_engine()
        except Exception:
            log.exception("this worker cannot reach its engines")
            os._exit(3)  # gunicorn's "worker failed to boot": the master stops too, with this status

    threading.Thread(target=start, name="engine-connect", daemon=True).start()


def start_engine(settings: Settings | None = None) -> Server:
    """Connect this worker to every engine as they come to serve (started here if no master did) and start the
    threads that take their results."""
    if current is not None:
        return current
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The threads that take the engines' results hand them to the HTTP threads every step; with hundreds of those
    # runnable they would wait up to the default 5 ms switch interval for the GIL, longer than a whole step.
    sys.setswitchinterval(GIL_SWITCH_S)
    s = settings or Settings.from_env()
    if engines is None:
        start_engines(s)
        wait_for_engines()
    if engines.owner != os.getpid():
        engines.forget()  # the master's connections: an engine must see them close when the master goes
    get_tokenizer()  # a second or two, while the engines load: before this worker serves, not in its first burst
    router = Router([(p.address, p.authkey) for p in engines.processes], s.max_waiting, s.data_dir,
                    slack_tokens=s.routing_slack_tokens)
    serve(s, router, {k: v for k, v in router.info.items() if k not in ("block-size", "kv-blocks-total")})
    gc.freeze()  # what is loaded now lives as long as the worker: a full collection need not walk it
    log.info("serving %s with policy %s on %d engine(s)", s.model, s.policy, router.info["engines"])
    return current


def startup_failure(s: Settings, e: Exception) -> str:
    what = " ".join(str(e).split())[:300].rstrip(".") or type(e).__name__  # libraries' messages span lines
    if s.weights == "pretrained":
        todo = (f"make {s.model}'s weights available offline (the local Hugging Face cache, or MODEL=a local "
                "directory or nanoGPT checkpoint), or set WEIGHTS=auto or WEIGHTS=random to serve random weights")
    else:
        todo = "check MODEL, WEIGHTS, DEVICE and DTYPE (README, Server settings)"
    kind = "" if isinstance(e, EngineStartFailed) else f"{type(e).__name__}: "  # the engine's says its own
    return f"cannot serve {s.model} ({s.weights} weights, device {s.device}): {kind}{what}. To fix: {todo}"


def serve(settings: Settings, engine: Engine, info: dict) -> Server:
    """Attach this worker's metrics to an engine, start it and route requests to it."""
    global current
    metrics = EngineMetrics(settings.served_model_name or settings.model, settings.policy, settings.prefix_caching)
    engine.on_finish.append(metrics.record)
    engine.start()
    metrics.start_publisher(engine)
    current = Server(settings, engine, metrics, info)
    return current


def stop_engine() -> None:
    """This worker leaves the engines (its requests still in flight are aborted); a worker that started the
    engines itself stops them too."""
    if current is not None:
        current.engine.stop()
    stop_engines()
