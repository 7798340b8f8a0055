"""What crosses the line between a server's processes, written down once, and the `Engine` interface the HTTP
side is typed against.

Processes (serving/README in the module docstrings): gunicorn's master starts the engine processes
(serving/master.py), each HTTP worker connects to every engine (serving/client.py) and routes each request to one
(serving/router.py), each engine process runs the steps (serving/engine_main.py). Connections are
multiprocessing.connection over Unix sockets; every message is one of the dataclasses below, pickled.

  master -> engine   on its stdin: EngineSpec; the engine connects to the master's control address and says
                     Started | StartFailed; later Stop (or the connection's end) stops the engine. Workers connect
                     to the engine's own address, which it listens on once its model is built
  worker -> engine   Submit | Abort | Ask | Bye (abort mine and let me go; a connection that just ends is the same)
  engine -> worker   Ready on connecting; Update after steps that produced something for the worker (and at least
                     every HEARTBEAT_S); Answer (tagged with its Ask's id); Dead if the engine cannot go on

Nothing here imports torch: the HTTP processes never load it.
"""
from dataclasses import dataclass
from typing import Protocol

from batching import Inference, Limits, Result  # Result: a finished request's account, sent as it is
from engine.params import SampledToken, SamplingParams
from telemetry.stats import ServerStats


@dataclass
class EngineSpec:
    """What an engine process is told on its stdin: its settings, its place among the server's engines, where the
    master waits to be greeted (its own address and key), and the key every worker's connection must prove."""
    settings: object  # engine.config.Settings
    index: int
    control_address: str
    control_key: bytes
    authkey: bytes


@dataclass
class Started:
    info: dict  # what /health and /stats say about the engine (model, device, KV pool, ...)


@dataclass
class StartFailed:
    error: str


@dataclass
class Stop:
    pass


@dataclass
class Submit:
    """A request's sequence, as the engine needs it; `id` is the worker's Inference.id."""
    id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    stream: bool
    cache_salt: str | None


@dataclass
class Abort:
    id: int


@dataclass
class Ask:
    """A question: "stats" (the engine's statistics, to be merged with the other engines'), "timeline" (its
    schedule after step `arg`) or "csv"."""
    id: int
    what: str
    arg: object = None


@dataclass
class Bye:
    pass


# A stream's new text in an Update: (the worker's request id, the text, how many of the request's output tokens
# the text sent so far covers, their logprobs when asked). A plain tuple: with a token per event a step sends one
# per stream, and 256 dataclasses took 12x as long to pickle as 256 tuples (240 vs 20 us on the development CPU),
# on the engine's one thread.
Delta = tuple[int, str, int, list[SampledToken]]


@dataclass
class Ready:
    info: dict
    load: dict


@dataclass
class Update:
    deltas: list[Delta]
    results: list[Result]
    load: dict  # BatchingManager.load(), and "received": how many of this worker's Submits the engine has taken


@dataclass
class Answer:
    id: int
    value: object


@dataclass
class Dead:
    error: str


class Engine(Protocol):
    """What the HTTP side drives: a BatchingManager in this process (tests, benchmarks), or the engine processes
    of a server through a Router. Methods are called from HTTP threads."""

    limits: Limits
    fatal_error: str | None
    on_finish: list  # callbacks(Inference) as requests finish (this process's metrics)

    @property
    def alive(self) -> bool: ...

    @property
    def last_step_time(self) -> float: ...

    def enqueue(self, inf: Inference) -> Inference: ...

    def abort(self, inf: Inference) -> None: ...

    def load(self) -> dict: ...

    def stats(self) -> ServerStats: ...  # every engine's requests (/stats figures, the token CSV)

    def timeline_since(self, since: int = 0, engine: int = 0) -> dict: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


