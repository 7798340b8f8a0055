"""The batching engine in a process of its own, shared by the server's HTTP workers.

In one process the engine thread and hundreds of HTTP threads share one GIL: the engine lets go of it at every
wait for the GPU, then waits its turn behind the request threads, and a server on an H200 delivered a third of
its engine's tokens/s. And one HTTP process takes about a millisecond of Python per request, so a hundred
requests arriving at once take a tenth of a second to reach any engine. So the engine runs the
`BatchingManager`'s steps alone in its own process, and any number of gunicorn workers feed it.

Who does what:
  gunicorn's master  starts the engine (`EngineProcess`) before it forks the workers, starts a new one before it
                     forks a worker if the engine died, and stops it last;
  each worker        connects (`EngineClient`) and keeps the `Inference` objects its HTTP threads wait on (each
                     with its `threading.Event`); a receiver thread mirrors the engine's results into them: a
                     stream's text as it grows (at most every STREAM_INTERVAL_MS), everything else when the
                     request finishes. `EngineClient` has the interface of `BatchingManager` that the HTTP side
                     uses (enqueue, abort, load, alive, on_finish, timeline, ...);
  the engine         steps, and answers every worker on that worker's connection.

Connections: multiprocessing.connection over a Unix socket in a directory only this user can enter, with a
random key that the master hands to the workers it forks (and to the engine on its stdin). Messages, pickled:
  master -> engine   its connection comes first: ("ready", info) | ("failed", error) once the model is built;
                     later ("stop",), or the connection's end, stops the engine
  worker <-> engine  engine: ("ready", info, load) on connecting, ("update", deltas, results, load) after steps that
                     produced something for this worker (and at least every HEARTBEAT_S), ("answer", x),
                     ("dead", error) if it cannot go on;
                     worker: ("submit", Submitted) | ("abort", id) | ("ask", "timeline" | "stats" | "csv", arg) |
                     ("bye",): abort mine and close (a connection that just ends is taken the same way)
The schedule (telemetry/timeline.py) and /stats are kept where the requests of every worker meet: the engine.
All processes read time.perf_counter (CLOCK_MONOTONIC), so the engine's timestamps are the workers' too.
"""
import gc
import logging
import os
import pickle
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener, wait

from batching import FINISHED, BatchingManager, Inference, Overloaded, announce_finished, check_fits, make_policy
from engine.config import Settings
from engine.sampler import SamplingParams
from telemetry.stats import ServerStats
from telemetry.timeline import Timeline

log = logging.getLogger("effective-batching")

ROOT = os.path.dirname(os.path.abspath(__file__))
HEARTBEAT_S = 0.05  # the longest a worker's view of the engine's load is behind while it runs
ASK_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
IDLE_WAIT_S = 0.01  # the original's polling period; a message wakes the engine at once anyway
RESULT_FIELDS = ("state", "finish_reason", "error", "output_ids", "token_ids", "logprobs", "text", "scheduled_time",
                 "first_token_time", "token_times", "finish_time", "num_preemptions", "seed", "streamed_tokens")


class EngineStartFailed(RuntimeError):
    """The engine process could not build its engine (weights, device, memory); the message is its error."""


@dataclass
class Submitted:
    """What the engine needs of a request's sequence."""
    id: int  # the worker's Inference.id
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    stream: bool


class EngineProcess:
    """The engine process as the process that started it sees it (gunicorn's master, or a lone worker): start it,
    wait until its model is built, tell whether it still runs, stop it."""

    def __init__(self, settings: Settings):
        self._directory = tempfile.mkdtemp(prefix="effective-batching-engine-")  # mode 0700
        self.address = os.path.join(self._directory, "engine.sock")
        self.authkey = secrets.token_bytes(32)
        self.owner = os.getpid()  # a process forked from this one inherits the handle, not the engine
        self.process = subprocess.Popen([sys.executable, "-m", "engine_process", self.address], cwd=ROOT,
                                        stdin=subprocess.PIPE)
        self.process.stdin.write(pickle.dumps((settings, self.authkey)))
        self.process.stdin.close()
        try:
            self._control = self._connect()
            kind, answer = self._control.recv()  # the model loads meanwhile
        except (EOFError, OSError):
            self.stop()
            raise RuntimeError(f"the engine process exited with code {self.process.returncode} before it was ready "
                               "(the log above says why)") from None
        if kind == "failed":
            self.stop()
            raise EngineStartFailed(answer)
        self.info = answer

    def _connect(self) -> Connection:
        while True:
            try:
                return Client(self.address, family="AF_UNIX", authkey=self.authkey)
            except (FileNotFoundError, ConnectionRefusedError):  # not listening yet
                if self.process.poll() is not None:
                    raise EOFError from None
                time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the engine: it aborts what is in flight, sends each worker its results, and exits."""
        try:
            self._control.send(("stop",))
        except (AttributeError, OSError):  # never connected, or already gone
            pass
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self._directory, ignore_errors=True)

    def forget(self) -> None:
        """In a process forked from the one that started the engine: let go of the master's connection (the
        engine stops when the master's end closes, which this copy would hold open)."""
        self._control.close()


class EngineClient:
    """A worker's handle on the engine. Threads: HTTP threads call enqueue/abort (a lock orders their writes to
    the connection); one receiver thread applies the engine's updates and runs the on_finish callbacks."""

    def __init__(self, address: str, authkey: bytes, max_waiting: int):
        self._conn = Client(address, family="AF_UNIX", authkey=authkey)
        _, self.info, self._load = self._conn.recv()  # ("ready", info, load)
        self.max_context, self.max_waiting = self.info["max-context"], max_waiting
        self.on_finish: list = []
        self.on_fatal: list = []
        self.fatal_error: str | None = None
        self._stopping = False
        self._closed = False
        self.last_step_time = time.monotonic()
        self._lock = threading.Lock()
        self._in_flight: dict[int, Inference] = {}
        self._submitted = 0
        self._asking = threading.Lock()  # one question at a time, so an answer is the asker's
        self._answered = threading.Event()
        self._answer = None
        self.timeline = _Remote(self, "timeline")
        self.stats = _Remote(self, "stats")
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

    def ask(self, what: str, arg=None):
        """The engine's answer to a question: its timeline, its /stats figures, or the token CSV's path."""
        with self._asking:
            self._answered.clear()
            with self._lock:
                self._send(("ask", what, arg))
            if not self._answered.wait(ASK_TIMEOUT_S):
                raise TimeoutError(f"the engine did not answer for its {what}")
            return self._answer

    @property
    def alive(self) -> bool:
        return self.fatal_error is None and not self._closed

    def _waiting(self) -> int:
        """The engine's queue as it last said, plus what it has not received from this worker yet (lock held)."""
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
        """Leave the engine: it aborts this worker's requests and sends their results before it lets go."""
        self._stopping = True
        with self._lock:
            self._send(("bye",))
        self._receiver.join(timeout=STOP_TIMEOUT_S)
        self._conn.close()
        self._fail_in_flight("abort", "the server is shutting down")  # what an engine that did not answer left

    # ---- the receiver thread ----

    def _receive(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "dead":
                    raise RuntimeError(message[1])
                if message[0] == "answer":
                    self._answer = message[1]
                    self._answered.set()
                    continue
                _, deltas, results, load = message
                self._apply(deltas, results, load)
        except (EOFError, OSError):
            self._closed = True
            self._die("the engine process exited")
        except Exception as e:
            self._closed = True
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
        if self._stopping or self.fatal_error is not None:  # left on purpose, or already failed
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


class _Remote:
    """What the engine keeps for every worker (its Timeline, its ServerStats), as a worker reads it."""

    def __init__(self, engine: EngineClient, what: str):
        self.engine, self.what = engine, what

    def snapshot(self, since=None) -> dict:
        return self.engine.ask(self.what, since)

    def write_token_csv(self) -> str:
        return self.engine.ask("csv")


# ---- the engine process ----

class _Worker:
    """A connected HTTP worker, in the engine process: its requests (by the worker's ids) and what it is owed."""

    def __init__(self, conn: Connection):
        self.conn: Connection | None = conn  # None once the worker is gone
        self.infs: dict[int, Inference] = {}
        self.deltas: list[tuple] = []
        self.results: list[dict] = []
        self.received = 0
        self.leaving = False
        self.last_update = 0.0  # when it was last sent an update


class _Collector:
    """A sequence's stream sink in the engine process. Its text goes out with a step's update, with how many of its
    tokens that text covers and their logprobs (when asked for): the first text at once (time to first token), then
    at most every `interval` seconds, the rest when the sequence finishes. On a GPU a step takes 2 ms: a delta per
    token would be 500 pickled deltas, thread wake-ups and SSE writes a second for each stream, work that a
    worker with a hundred streams cannot keep up with while it also takes new requests; every 20 ms is smooth
    to a reader and ten times less work. Between sends the engine does not even cut the text (`due`)."""

    def __init__(self, inf: Inference, worker_id: int, worker: _Worker, interval: float):
        self.inf, self.worker_id, self.worker, self.interval = inf, worker_id, worker, interval
        self.sent_logprobs = 0
        self.last_sent = float("-inf")

    def due(self) -> bool:
        return time.monotonic() - self.last_sent >= self.interval

    def put(self, text: str | None) -> None:
        if not text:
            return
        inf = self.inf
        logprobs = inf.logprobs[self.sent_logprobs:inf.streamed_tokens]
        self.sent_logprobs, self.last_sent = inf.streamed_tokens, time.monotonic()
        self.worker.deltas.append((self.worker_id, text, inf.streamed_tokens, logprobs))


def _engine_main(address: str) -> None:
    """`python -m engine_process ADDRESS`, started by EngineProcess: settings and key come on stdin."""
    settings, authkey = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C and gunicorn's SIGTERM reach the whole process group: the master stops the engine after its workers
    # have left, not the signal before them (and a master that dies closes its connection, which stops it too).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    listener = Listener(address, family="AF_UNIX", authkey=authkey)
    control = listener.accept()  # the master's, first
    from engine.build import build_runner  # torch and the model: in this process only
    try:
        runner, info = build_runner(settings)
    except Exception as e:  # the master says what failed, in one line
        control.send(("failed", f"{type(e).__name__}: {e}"))
        return
    manager = BatchingManager(runner, make_policy(settings.policy, settings.max_batch), settings.max_step_tokens,
                              max_waiting=1 << 62,  # the workers refuse what does not fit, before sending
                              overlap=info["overlap-steps"], check_invariants=settings.check_invariants)
    manager.attach_timeline(Timeline())
    stats = ServerStats(settings.policy, settings.data_dir)
    manager.on_finish.append(stats.record)
    bm = runner.block_manager
    info = {**info, "block-size": bm.block_size, "kv-blocks-total": bm.num_blocks, "engine-pid": os.getpid()}
    control.send(("ready", info))
    gc.freeze()  # the model, torch and the graphs live as long as the engine: a full collection (tens of ms with
    # them in it, a gap in the steps) need not walk them
    _EngineLoop(manager, stats, listener, control, info, settings.stream_interval_ms / 1000).run()


class _EngineLoop:

    def __init__(self, manager: BatchingManager, stats: ServerStats, listener: Listener, control: Connection,
                 info: dict, stream_interval_s: float):
        self.manager, self.stats, self.listener, self.control = manager, stats, listener, control
        self.info, self.stream_interval_s = info, stream_interval_s
        self.workers: list[_Worker] = []
        self.owners: dict[int, tuple[_Worker, int]] = {}  # engine Inference.id -> (its worker, the worker's id)
        self.connected: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self.stopping = False
        manager.on_finish.append(self._finished)
        threading.Thread(target=self._accept, name="accept", daemon=True).start()

    def _accept(self) -> None:
        """Take workers' connections (the key is checked here), for the loop to greet at its next turn."""
        while True:
            try:
                self.connected.put(self.listener.accept())
            except OSError:  # the listener closed: the engine is stopping
                return
            except Exception as e:  # a client without the key
                log.warning("refused a connection to the engine: %s", e)

    def run(self) -> None:
        try:
            while not self.stopping:
                # the exchange with the workers runs while the device computes a step: what the last step read
                # produced goes out, and new requests come in, without adding host time to the step
                if self.manager.step(meanwhile=self._exchange):
                    continue
                if not self._exchange() and not self.stopping:  # nothing to run and nothing came in: wait
                    wait([w.conn for w in self.workers if w.conn] + [self.control], IDLE_WAIT_S)
        except BaseException as e:  # a bug in the engine itself: say so to every worker, which fails its requests
            log.exception("the engine died")
            for worker in self.workers:
                self._send(worker, ("dead", f"{e!r}"))
            raise SystemExit(1) from e
        self.listener.close()
        self.manager.stop()  # abort what is in flight, and say so
        self._update()

    def _exchange(self) -> int:
        """Send every worker what it is owed, then greet new workers and apply what the workers sent (stopping
        once the master says so, or is gone). Returns how many messages came in."""
        self._update()
        while not self.connected.empty():
            worker = _Worker(self.connected.get())
            self.workers.append(worker)
            self._send(worker, ("ready", self.info, {**self.manager.load(), "received": 0}))
        by_conn = {w.conn: w for w in self.workers if w.conn}
        ready = wait([*by_conn, self.control], 0)  # one poll for every connection
        try:
            if self.control in ready and self.control.recv()[0] == "stop":
                self.stopping = True
        except (EOFError, OSError):
            self.stopping = True
        taken = 0
        for worker in (by_conn[conn] for conn in ready if conn is not self.control):
            try:
                while worker.conn and worker.conn.poll(0):
                    self._handle(worker, *worker.conn.recv())
                    taken += 1
            except (EOFError, OSError):  # the worker is gone without a word
                worker.conn.close()
                worker.conn = None
                self._leave(worker)
        return taken

    def _handle(self, worker: _Worker, kind: str, *args) -> None:
        if kind == "submit":
            self._submit(worker, args[0])
        elif kind == "abort" and args[0] in worker.infs:
            self.manager.abort(worker.infs[args[0]])
        elif kind == "ask":
            what, arg = args
            answer = (self.manager.timeline.snapshot(arg) if what == "timeline" else
                      self.stats.snapshot(arg) if what == "stats" else self.stats.write_token_csv())
            self._send(worker, ("answer", answer))
        elif kind == "bye":
            self._leave(worker)

    def _leave(self, worker: _Worker) -> None:
        """The worker is going (or gone): abort its requests; it is let go once their results are sent."""
        worker.leaving = True
        for inf in worker.infs.values():
            self.manager.abort(inf)

    def _submit(self, worker: _Worker, s: Submitted) -> None:
        inf = Inference("", s.prompt_ids, s.params, s.request_id)
        inf.arrival_time = s.arrival_time
        if s.stream:
            inf.stream = _Collector(inf, s.id, worker, self.stream_interval_s)
        worker.received += 1
        worker.infs[s.id] = inf
        self.owners[inf.id] = (worker, s.id)
        try:
            self.manager.enqueue(inf)
        except ValueError as e:  # the worker checks first; a limit that differs here fails this request only
            inf.finish_reason, inf.error, inf.state = "error", str(e), FINISHED
            self._finished(inf)

    def _finished(self, inf: Inference) -> None:
        worker, worker_id = self.owners.pop(inf.id)
        worker.infs.pop(worker_id, None)
        worker.results.append({"id": worker_id, **{name: getattr(inf, name) for name in RESULT_FIELDS}})

    def _update(self) -> None:
        """Send each worker what it is owed, or at least the load every HEARTBEAT_S; let go of workers that left."""
        now = time.monotonic()
        load = None
        for worker in self.workers:
            if worker.deltas or worker.results or now - worker.last_update > HEARTBEAT_S:
                load = load or self.manager.load()
                self._send(worker, ("update", worker.deltas, worker.results, {**load, "received": worker.received}))
                worker.deltas, worker.results, worker.last_update = [], [], now
        for worker in [w for w in self.workers if w.leaving and not w.infs]:
            if worker.conn:
                worker.conn.close()
            self.workers.remove(worker)

    def _send(self, worker: _Worker, message: tuple) -> None:
        if worker.conn is None:
            return
        try:
            worker.conn.send(message)
        except OSError:  # the worker is gone
            worker.conn = None
            self._leave(worker)


if __name__ == "__main__":
    import engine_process  # the module's own classes, not copies under __main__, for what arrives pickled
    engine_process._engine_main(sys.argv[1])
