"""The serving state of one gunicorn worker: settings, the engine thread, /stats, /metrics and /timeline bookkeeping.

`start_engine` runs once per worker (`gunicorn_conf.post_worker_init`), never in the master process: CUDA and
threads do not survive a fork. The routes read the state through `running()`.
"""
import logging
import time
from dataclasses import dataclass, field

from api.errors import ApiError
from batching import BatchingManager, make_policy
from engine.config import Settings
from telemetry.prometheus import EngineMetrics
from telemetry.stats import ServerStats
from telemetry.timeline import Timeline

log = logging.getLogger("effective-batching")


@dataclass
class Server:
    settings: Settings
    manager: BatchingManager
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


def start_engine(settings: Settings | None = None) -> Server:
    """Load the model, build the engine and start its thread."""
    if current is not None:
        return current
    from engine.build import build_runner  # torch: loaded in the worker only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = settings or Settings.from_env()
    policy = make_policy(s.policy, s.max_batch)
    runner, info = build_runner(s)
    serve(s, BatchingManager(runner, policy, s.max_step_tokens, s.max_waiting), info)
    log.info("serving %s with policy %s", s.model, s.policy)
    return current


def serve(settings: Settings, manager: BatchingManager, info: dict) -> Server:
    """Attach statistics, metrics and the timeline to an engine, start its thread and route requests to it."""
    global current
    stats = ServerStats(settings.policy, settings.data_dir)
    metrics = EngineMetrics(settings.served_model_name or settings.model, settings.policy)
    manager.on_finish += [stats.record, metrics.record]
    timeline = Timeline()
    manager.attach_timeline(timeline)
    manager.start()
    metrics.start_publisher(manager)
    current = Server(settings, manager, stats, metrics, timeline, info)
    return current


def stop_engine() -> None:
    if current is not None:
        current.manager.stop()
