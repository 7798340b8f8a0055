"""The batching engine in a process of its own, beside the HTTP worker.

In one process the engine thread and hundreds of HTTP threads share one GIL: the engine lets go of it at every
wait for the GPU, then waits its turn behind the request threads, and a server on an H200 delivered a third of
its engine's tokens/s. Here a child process runs the `BatchingManager`'s steps alone. The worker keeps the
`Inference` objects its HTTP threads wait on (each with its `threading.Event`) and mirrors the engine's results
into them: a stream's text as it grows (at most every STREAM_INTERVAL_MS), everything else when the request
finishes. `EngineProcess` has the interface of `BatchingManager` that the HTTP side uses (enqueue, abort, load,
alive, on_finish, ...).

Messages, pickled over one pipe:
  worker -> engine  ("submit", Submitted) | ("abort", id) | ("timeline", since) | ("stop",)
  engine -> worker  ("ready", info) at start, then ("update", deltas, results, load) after steps that produced
                    something (and at least every HEARTBEAT_S), ("timeline", snapshot) when asked, ("dead", error)
                    if the engine cannot go on
The schedule (telemetry/timeline.py) is recorded where the steps run; GET /timeline asks the engine for it.
Both processes read time.perf_counter (CLOCK_MONOTONIC), so the engine's timestamps are the worker's too.
"""
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass

from batching import FINISHED, BatchingManager, Inference, Overloaded, announce_finished, check_fits, make_policy
from engine.config import Settings
from engine.sampler import SamplingParams
from telemetry.timeline import Timeline

log = logging.getLogger("effective-batching")

HEARTBEAT_S = 0.05  # the longest the worker's view of the engine's load is behind while it runs
ASK_TIMEOUT_S = 10.0
IDLE_WAIT_S = 0.01  # the original's polling period; a new request wakes the engine at once anyway
RESULT_FIELDS = ("state", "finish_reason", "error", "output_ids", "token_ids", "logprobs", "text", "scheduled_time",
                 "first_token_time", "token_times", "finish_time", "num_preemptions", "seed", "streamed_tokens")


class EngineStartFailed(RuntimeError):
    """The engine process could not build its engine (weights, device, memory); the message is its error."""


@dataclass
class Submitted:
    """What the engine needs of a request's sequence."""
    id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    stream: bool


class EngineProcess:
    """The worker's handle on the engine process. Threads: HTTP threads call enqueue/abort (a lock orders their
    writes to the pipe); one receiver thread applies the engine's updates and runs the on_finish callbacks."""

    def __init__(self, settings: Settings):
        context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(settings, child_end), name="engine", daemon=True)
        self._process.start()
        child_end.close()
        try:
            kind, answer = self._conn.recv()  # the model loads in the child meanwhile
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine process exited with code {self._process.exitcode} before it was ready "
                               "(the log above says why)") from None
        if kind == "failed":
            self._process.join(5)
            raise EngineStartFailed(answer)
        self.info = {**answer, "engine-pid": self._process.pid}
        self.max_context, self.max_waiting = self.info["max-context"], settings.max_waiting
        self.on_finish: list = []
        self.on_fatal: list = []
        self.fatal_error: str | None = None
        self._stopping = False
        self.last_step_time = time.monotonic()
        self._lock = threading.Lock()
        self._in_flight: dict[int, Inference] = {}
        self._submitted = 0
        self._load = dict(running=0, waiting=0, received=0)
        self.timeline = _RemoteTimeline(self)
        self._receiver = threading.Thread(target=self._receive, name="engine-receiver", daemon=True)

    # ---- called from HTTP threads ----

    def enqueue(self, inf: Inference) -> Inference:
        check_fits(inf, self.max_context, self.info["block-size"], self.info["kv-blocks-total"])
        with self._lock:
            if self._waiting() >= self.max_waiting:
                raise Overloaded(f"{self.max_waiting} requests are already waiting; try again later")
            self._in_flight[inf.id] = inf
            self._submitted += 1
            self._send(("submit", Submitted(inf.id, inf.request_id, inf.prompt_ids, inf.params, inf.arrival_time,
                                            inf.stream is not None)))
        return inf

    def abort(self, inf: Inference) -> None:
        if not inf.done:
            with self._lock:
                self._send(("abort", inf.id))

    def load(self) -> dict:
        with self._lock:
            load = {k: v for k, v in self._load.items() if k != "received"}
            load["waiting"] = self._waiting()
        return load

    @property
    def alive(self) -> bool:
        return self.fatal_error is None and self._process.is_alive()

    def _waiting(self) -> int:
        """The engine's queue as it last said, plus what it has not received yet (lock held)."""
        return self._load["waiting"] + self._submitted - self._load["received"]

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:  # the engine is gone; the receiver thread fails what is in flight
            pass

    # ---- lifetime ----

    def start(self) -> None:
        self._receiver.start()

    def stop(self) -> None:
        """Stop the engine: it aborts what is in flight and sends those results before it exits."""
        self._stopping = True
        with self._lock:
            self._send(("stop",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            log.warning("the engine process did not stop within 30 s; terminating it")
            self._process.terminate()
        self._receiver.join(timeout=5)
        self._fail_in_flight("abort", "the server is shutting down")  # what a terminated engine left

    # ---- the receiver thread ----

    def _receive(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "dead":
                    raise RuntimeError(message[1])
                if message[0] == "timeline":
                    self.timeline.answered(message[1])
                    continue
                _, deltas, results, load = message
                self._apply(deltas, results, load)
        except EOFError:
            self._die("the engine process exited")
        except Exception as e:
            self._die(str(e))

    def _apply(self, deltas: list[tuple], results: list[dict], load: dict) -> None:
        with self._lock:
            self._load = load
            self.last_step_time = time.monotonic()
            infs = {item["id"]: self._in_flight.pop(item["id"], None) for item in results}
        for inf_id, text, streamed_tokens, logprobs in deltas:
            inf = self._in_flight.get(inf_id) or infs.get(inf_id)
            if inf is not None and inf.stream is not None:
                inf.logprobs.extend(logprobs)  # those of the tokens this text completes: a stream sends them with it
                inf.streamed_tokens = streamed_tokens
                inf.stream.put(text)
        for item in results:
            inf = infs[item["id"]]
            if inf is not None:
                for name in RESULT_FIELDS:
                    setattr(inf, name, item[name])
                self._finished(inf)

    def _finished(self, inf: Inference) -> None:
        if inf.stream is not None:
            inf.stream.put(None)  # end of stream, after its fields are set
        announce_finished(inf, self.on_finish)

    def _die(self, error: str) -> None:
        if self._stopping or self.fatal_error is not None:  # stopped on purpose, or already failed
            return
        self.fatal_error = f"engine process died: {error}"
        log.error("%s", self.fatal_error)
        self._fail_in_flight("error", self.fatal_error)
        for callback in self.on_fatal:
            callback(self.fatal_error)

    def _fail_in_flight(self, reason: str, error: str) -> None:
        with self._lock:
            in_flight, self._in_flight = list(self._in_flight.values()), {}
        for inf in in_flight:
            inf.finish_reason, inf.error, inf.finish_time = reason, error, time.perf_counter()
            inf.state = FINISHED
            self._finished(inf)


class _RemoteTimeline:
    """The engine process's Timeline as the worker sees it: snapshot() asks for it over the pipe."""

    def __init__(self, engine: EngineProcess):
        self.engine = engine
        self._asking = threading.Lock()  # one question at a time, so an answer is the asker's
        self._answered = threading.Event()
        self._answer: dict | None = None

    def snapshot(self, since: int = 0) -> dict:
        with self._asking:
            self._answered.clear()
            with self.engine._lock:
                self.engine._send(("timeline", since))
            if not self._answered.wait(ASK_TIMEOUT_S):
                raise TimeoutError("the engine did not answer for its timeline")
            return self._answer

    def answered(self, snapshot: dict) -> None:
        self._answer = snapshot
        self._answered.set()


# ---- the engine process ----

class _Collector:
    """A sequence's stream sink in the engine process. Its text goes out with a step's update, with how many of its
    tokens that text covers and their logprobs (when asked for): the first text at once (time to first token), then
    at most every `interval` seconds, the rest when the sequence finishes. On a GPU a step takes 2 ms: a delta per
    token would be 500 pickled deltas, thread wake-ups and SSE writes a second for each stream, work that a
    worker with a hundred streams cannot keep up with while it also takes new requests; every 20 ms is smooth
    to a reader and ten times less work."""

    def __init__(self, inf: Inference, loop: "_EngineLoop"):
        self.inf, self.loop = inf, loop
        self.text = ""  # not sent yet
        self.sent_logprobs = 0
        self.last_sent = float("-inf")

    def put(self, text: str | None) -> None:
        if text:
            self.text += text
            self.loop.pending[self.inf.id] = self

    def due(self, now: float) -> bool:
        return self.inf.done or now - self.last_sent >= self.loop.stream_interval_s

    def take(self, now: float) -> tuple:
        inf = self.inf
        logprobs = inf.logprobs[self.sent_logprobs:inf.streamed_tokens]
        self.sent_logprobs, self.last_sent = inf.streamed_tokens, now
        delta, self.text = (inf.id, self.text, inf.streamed_tokens, logprobs), ""
        return delta


def _engine_main(settings: Settings, conn) -> None:
    from engine.build import build_runner  # torch and the model: in this process only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runner, info = build_runner(settings)
    except Exception as e:  # the worker says what failed, in one line
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    manager = BatchingManager(runner, make_policy(settings.policy, settings.max_batch), settings.max_step_tokens,
                              max_waiting=1 << 62)  # the worker refuses what does not fit, before sending
    manager.attach_timeline(Timeline())
    bm = runner.block_manager
    conn.send(("ready", {**info, "block-size": bm.block_size, "kv-blocks-total": bm.num_blocks}))
    _EngineLoop(manager, conn, settings.stream_interval_ms / 1000).run()


class _EngineLoop:

    def __init__(self, manager: BatchingManager, conn, stream_interval_s: float):
        self.manager, self.conn, self.stream_interval_s = manager, conn, stream_interval_s
        self.infs: dict[int, Inference] = {}
        self.pending: dict[int, _Collector] = {}  # streams with text not sent yet
        self.deltas: list[tuple] = []
        self.results: list[dict] = []
        self.received = 0
        self.last_update = 0.0
        manager.on_finish.append(self._finished)

    def run(self) -> None:
        try:
            while self._read_messages():
                busy = self.manager.step()
                self._update()
                if not busy:
                    self.conn.poll(IDLE_WAIT_S)  # returns as soon as a message arrives
        except EOFError:  # the worker is gone
            return
        except BaseException as e:  # a bug in the engine itself: say so, and let the worker decide
            log.exception("the engine died")
            self.conn.send(("dead", f"{e!r}"))
            raise SystemExit(1)
        self.manager.stop()  # asked to stop: abort what is in flight, and say so
        self._update()

    def _read_messages(self) -> bool:
        """Apply what the worker sent; False once it asks to stop."""
        while self.conn.poll(0):
            kind, *args = self.conn.recv()
            if kind == "stop":
                return False
            if kind == "submit":
                self._submit(args[0])
            elif kind == "timeline":
                self.conn.send(("timeline", self.manager.timeline.snapshot(args[0])))
            elif kind == "abort" and args[0] in self.infs:
                self.manager.abort(self.infs[args[0]])
        return True

    def _submit(self, s: Submitted) -> None:
        inf = Inference("", s.prompt_ids, s.params, s.request_id)
        inf.id, inf.arrival_time = s.id, s.arrival_time
        if s.stream:
            inf.stream = _Collector(inf, self)
        self.received += 1
        self.infs[inf.id] = inf
        try:
            self.manager.enqueue(inf)
        except ValueError as e:  # the worker checks first; a limit that differs here fails this request only
            inf.finish_reason, inf.error, inf.state = "error", str(e), FINISHED
            self._finished(inf)

    def _finished(self, inf: Inference) -> None:
        self.infs.pop(inf.id, None)
        self.results.append({"id": inf.id, **{name: getattr(inf, name) for name in RESULT_FIELDS}})

    def _update(self) -> None:
        now = time.monotonic()
        for inf_id, collector in list(self.pending.items()):
            if collector.due(now):
                self.deltas.append(collector.take(now))
                del self.pending[inf_id]
        if not (self.deltas or self.results or now - self.last_update > HEARTBEAT_S):
            return
        load = {**self.manager.load(), "received": self.received}
        self.conn.send(("update", self.deltas, self.results, load))
        self.deltas.clear()
        self.results.clear()
        self.last_update = now
