"""The serving state of a gunicorn worker: settings, its handle on the engine (a process of its own, shared by
every worker: engine_process.py), /stats, /metrics and /timeline bookkeeping.

gunicorn's master starts the engine process (`start_engine_process`, from gunicorn_conf.when_ready) before it
forks the workers, and starts a new one before it forks a worker if the engine died (`engine_process_running`,
from pre_fork). Each worker connects to it (`start_engine`, from post_worker_init); a worker never touches CUDA,
nor does the master: CUDA and threads do not survive a fork. The routes read the worker's state through
`running()`.

A worker whose engine died cannot serve again, so it exits a moment later and gunicorn starts a fresh one, which
finds a fresh engine; meanwhile /health answers 503 with the reason.
"""
import gc
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from api.errors import ApiError
from batching import BatchingManager, make_policy
from engine.config import Settings
from engine.tokenizer import get_tokenizer
from engine_process import EngineClient, EngineProcess, EngineStartFailed
from telemetry.prometheus import EngineMetrics
from telemetry.stats import ServerStats
from telemetry.timeline import Timeline

log = logging.getLogger("effective-batching")

GIL_SWITCH_S = 0.0005
EXIT_GRACE_S = 2.0  # between the engine's death and the worker's exit: /health says why meanwhile


class StartupFailed(RuntimeError):
    """The server cannot start serving (the master its engine, or a worker its connection to it); the message
    says what failed and what to do, in one line."""


@dataclass
class Server:
    settings: Settings
    manager: BatchingManager | EngineClient
    stats: ServerStats
    metrics: EngineMetrics
    timeline: Timeline
    info: dict = field(default_factory=dict)
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or self.settings.model


current: Server | None = None


def running() -> Server:
    if current is None:
        raise ApiError(503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"})
    return current


engine_process: EngineProcess | None = None  # the engine this process started; a forked worker inherits it


def start_engine_process(settings: Settings | None = None) -> EngineProcess:
    """Start the engine process (it loads the model) and wait until it is ready: in gunicorn's master, before the
    workers are forked, or in a worker that no master gave one."""
    global engine_process
    s = settings or Settings.from_env()
    try:
        make_policy(s.policy, s.max_batch)  # an unknown policy fails here, before a model loads
        engine_process = EngineProcess(s)
    except Exception as e:
        raise StartupFailed(startup_failure(s, e)) from e
    return engine_process


def engine_process_running() -> None:
    """Start a new engine process if the last one died (the workers that fed it exit, and gunicorn forks new
    ones after this)."""
    if engine_process is not None and not engine_process.alive:
        log.error("the engine process exited with code %s; starting a new one", engine_process.process.returncode)
        engine_process.stop()
        start_engine_process()


def stop_engine_process() -> None:
    if engine_process is not None and engine_process.owner == os.getpid():
        engine_process.stop()


def start_engine(settings: Settings | None = None) -> Server:
    """Connect this worker to the engine process (started here if no master did) and start the thread that takes
    its results; the worker exits if the engine dies."""
    if current is not None:
        return current
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The thread that takes the engine's results hands them to the HTTP threads every step; with hundreds of
    # those runnable it would wait up to the default 5 ms switch interval for the GIL, longer than a whole step.
    sys.setswitchinterval(GIL_SWITCH_S)
    s = settings or Settings.from_env()
    process = engine_process or start_engine_process(s)
    if process.owner != os.getpid():
        process.forget()  # the master's connection: the engine must see it close when the master goes
    try:
        engine = EngineClient(process.address, process.authkey, s.max_waiting)
    except Exception as e:
        raise StartupFailed(startup_failure(s, e)) from e
    engine.on_fatal.append(exit_worker_soon)
    get_tokenizer()  # a second or two: before this worker takes requests, not during its first burst
    serve(s, engine, {k: v for k, v in engine.info.items() if k not in ("block-size", "kv-blocks-total")})
    gc.freeze()  # what is loaded now lives as long as the worker: a full collection need not walk it (tens of ms
    # with torch's modules in it, during which none of the worker's requests moves)
    log.info("serving %s with policy %s", s.model, s.policy)
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


def exit_worker_soon(reason: str) -> None:
    """An on_fatal callback (called when the engine dies): end this worker after EXIT_GRACE_S, the way
    gunicorn stops one (SIGTERM: a graceful exit), so that gunicorn starts a fresh worker in its place."""
    log.critical("%s; this worker exits in %.0f s and gunicorn starts a fresh one", reason, EXIT_GRACE_S)
    threading.Timer(EXIT_GRACE_S, os.kill, (os.getpid(), signal.SIGTERM)).start()


def serve(settings: Settings, manager: BatchingManager | EngineClient, info: dict) -> Server:
    """Attach statistics, metrics and the timeline to an engine (a BatchingManager in this process, or the engine
    process, which keeps its own statistics and timeline for every worker), start it and route requests to it."""
    global current
    metrics = EngineMetrics(settings.served_model_name or settings.model, settings.policy)
    manager.on_finish.append(metrics.record)
    if isinstance(manager, BatchingManager):
        stats = ServerStats(settings.policy, settings.data_dir)
        manager.on_finish.append(stats.record)
        if manager.timeline is None:
            manager.attach_timeline(Timeline())
    else:
        stats = manager.stats
    timeline = manager.timeline
    manager.start()
    metrics.start_publisher(manager)
    current = Server(settings, manager, stats, metrics, timeline, info)
    return current


def stop_engine() -> None:
    """This worker leaves the engine (its requests still in flight are aborted); a worker that started the
    engine process itself stops it too."""
    if current is not None:
        current.manager.stop()
    stop_engine_process()
