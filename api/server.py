"""The serving state of one gunicorn worker: settings, the engine thread, /stats and /metrics bookkeeping.

`start_engine` runs once per worker (`gunicorn_conf.post_worker_init`), never in the master process: CUDA and
threads do not survive a fork. The routes read the state through `running()`.

A worker whose engine thread died cannot serve again (the thread's model and device state are suspect), so it
exits a moment later and gunicorn starts a fresh one; meanwhile /health answers 503 with the reason.
"""
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from api.errors import ApiError
from batching import BatchingManager, make_policy
from engine.config import Settings
from telemetry.prometheus import EngineMetrics
from telemetry.stats import ServerStats

log = logging.getLogger("effective-batching")

EXIT_GRACE_S = 2.0  # between the engine's death and the worker's exit: /health says why meanwhile


class StartupFailed(RuntimeError):
    """The worker cannot start serving; the message says what failed and what to do, in one line."""


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


current: Server | None = None


def running() -> Server:
    if current is None:
        raise ApiError(503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"})
    return current


def start_engine(settings: Settings | None = None) -> Server:
    """Load the model, build the engine and start its thread; in a gunicorn worker, which exits if the thread
    dies."""
    if current is not None:
        return current
    from engine.build import build_runner  # torch: loaded in the worker only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = settings or Settings.from_env()
    try:
        policy = make_policy(s.policy, s.max_batch)
        runner, info = build_runner(s)
    except Exception as e:
        raise StartupFailed(startup_failure(s, e)) from e
    manager = BatchingManager(runner, policy, s.max_step_tokens, s.max_waiting)
    manager.on_fatal.append(exit_worker_soon)
    serve(s, manager, info)
    log.info("serving %s with policy %s", s.model, s.policy)
    return current


def startup_failure(s: Settings, e: Exception) -> str:
    what = " ".join(str(e).split())[:300].rstrip(".") or type(e).__name__  # libraries' messages span lines
    if s.weights == "pretrained":
        todo = (f"make {s.model}'s weights available offline (the local Hugging Face cache, or MODEL=a local "
                "directory or nanoGPT checkpoint), or set WEIGHTS=auto or WEIGHTS=random to serve random weights")
    else:
        todo = "check MODEL, WEIGHTS, DEVICE and DTYPE (README, Server settings)"
    return (f"cannot serve {s.model} ({s.weights} weights, device {s.device}): {type(e).__name__}: {what}. "
            f"To fix: {todo}")


def exit_worker_soon(reason: str) -> None:
    """An on_fatal callback (the dying engine thread calls it): end this worker after EXIT_GRACE_S, the way
    gunicorn stops one (SIGTERM: a graceful exit), so that gunicorn starts a fresh worker in its place."""
    log.critical("%s; this worker exits in %.0f s and gunicorn starts a fresh one", reason, EXIT_GRACE_S)
    threading.Timer(EXIT_GRACE_S, os.kill, (os.getpid(), signal.SIGTERM)).start()


def serve(settings: Settings, manager: BatchingManager, info: dict) -> Server:
    """Attach statistics and metrics to an engine, start its thread and route requests to it."""
    global current
    stats = ServerStats(settings.policy, settings.data_dir)
    metrics = EngineMetrics(settings.served_model_name or settings.model, settings.policy)
    manager.on_finish += [stats.record, metrics.record]
    manager.start()
    metrics.start_publisher(manager)
    current = Server(settings, manager, stats, metrics, info)
    return current


def stop_engine() -> None:
    if current is not None:
        current.manager.stop()
