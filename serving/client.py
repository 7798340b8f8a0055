"""Runs in an HTTP worker: its handle on one engine process (serving/engine_main.py).

The worker's `Inference` objects (each with the `threading.Event` its HTTP thread waits on) stay here; the engine
keeps its own sequences. A receiver thread takes the engine's messages: a stream's text as it grows (each step's,
or at most every STREAM_INTERVAL_MS), a request's `Result` when it finishes (`Inference.take_result`), answers to
questions (each matched to its question by id, so that a late answer can never be taken for another's), and the
engine's load.
When the engine goes away, the requests in flight go to `on_lost` (the router resubmits or fails them).

Threads: HTTP threads call enqueue/abort/ask (a lock orders their writes to the connection); the receiver thread
applies what arrives and runs the on_finish callbacks.
"""
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Client

from batching import Inference, Result, announce_finished
from serving.protocol import Abort, Answer, Ask, Bye, Dead, Ready, Submit, Update

log = logging.getLogger("effective-batching")

ASK_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0


class EngineStalled(TimeoutError):
    """The engine did not answer a question: it stalled, or it died meanwhile (HTTP 503)."""


class EngineClient:

    def __init__(self, address: str, authkey: bytes, on_lost: Callable[["EngineClient", list[Inference]], None]):
        self._conn = Client(address, family="AF_UNIX", authkey=authkey)
        ready: Ready = self._conn.recv()
        self.info, self._load = ready.info, ready.load
        self.index = self.info["engine"]
        self.on_finish: list = []
        self.on_lost = on_lost
        self.fatal_error: str | None = None
        self._stopping = False
        self.last_step_time = time.monotonic()
        self._lock = threading.Lock()
        self._in_flight: dict[int, Inference] = {}
        self._submitted = 0
        self._unreceived: deque[int] = deque()  # the work of each request the engine had not taken at its last word
        self._question_ids = itertools.count()
        self._answers: dict[int, list] = {}  # question id -> [Event, answer]
        self._receiver = threading.Thread(target=self._receive, name=f"engine-{self.index}-receiver", daemon=True)

    # ---- called from HTTP threads ----

    def enqueue(self, inf: Inference) -> Inference:
        with self._lock:
            self._in_flight[inf.id] = inf
            self._submitted += 1
            self._unreceived.append(outstanding_work(inf))
            self._send(Submit(inf.id, inf.request_id, inf.prompt_ids, inf.params, inf.arrival_time,
                              inf.stream is not None, inf.cache_salt))
        return inf

    def abort(self, inf: Inference) -> None:
        if not inf.done:
            with self._lock:
                self._send(Abort(inf.id))

    def load(self) -> dict:
        with self._lock:
            load = {k: v for k, v in self._load.items() if k != "received"}
            unreceived = self._submitted - self._load["received"]
            load["waiting"] += unreceived
            load["outstanding-tokens"] += sum(self._unreceived)
        return load

    def ask(self, what: str, arg=None):
        """The engine's answer to a question (serving.protocol.Ask)."""
        question = next(self._question_ids)
        waiting = self._answers[question] = [threading.Event(), None]
        try:
            with self._lock:
                self._send(Ask(question, what, arg))
            if not waiting[0].wait(ASK_TIMEOUT_S):
                raise EngineStalled(f"engine {self.index} did not answer for its {what} within {ASK_TIMEOUT_S:.0f} s")
            if self.fatal_error is not None and waiting[1] is None:  # woken by the engine's end, not an answer
                raise EngineStalled(self.fatal_error)
            return waiting[1]
        finally:
            self._answers.pop(question, None)

    @property
    def alive(self) -> bool:
        return self.fatal_error is None

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except OSError:  # the engine is gone; the receiver thread hands over what is in flight
            pass

    # ---- lifetime ----

    def start(self) -> None:
        self._receiver.start()

    def stop(self) -> None:
        """Leave the engine: it aborts this worker's requests and sends their results before it lets go."""
        self._stopping = True
        with self._lock:
            self._send(Bye())
        self._receiver.join(timeout=STOP_TIMEOUT_S)
        self._conn.close()
        for inf in self._take_in_flight():  # what an engine that did not answer left
            fail(inf, "abort", "the server is shutting down", self.on_finish)

    # ---- the receiver thread ----

    def _receive(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if isinstance(message, Update):
                    self._apply(message)
                elif isinstance(message, Answer):
                    waiting = self._answers.get(message.id)
                    if waiting is not None:  # else its asker gave up waiting
                        waiting[1] = message.value
                        waiting[0].set()
                elif isinstance(message, Dead):
                    raise RuntimeError(message.error)
        except (EOFError, OSError):
            self._lost("the engine process exited")
        except Exception as e:
            self._lost(str(e))

    def _apply(self, update: Update) -> None:
        with self._lock:
            self._load = update.load
            while len(self._unreceived) > self._submitted - update.load["received"]:
                self._unreceived.popleft()
            self.last_step_time = time.monotonic()
            finished = {r.id: self._in_flight.pop(r.id, None) for r in update.results}
        for id, text, streamed_tokens, logprobs in update.deltas:
            inf = self._in_flight.get(id) or finished.get(id)
            if inf is not None and inf.stream is not None:
                inf.logprobs.extend(logprobs)  # those of the tokens this text completes
                inf.streamed_tokens = streamed_tokens
                inf.stream.put(text)
        for result in update.results:
            inf = finished[result.id]
            if inf is not None:
                inf.take_result(result)
                end_stream_and_announce(inf, self.on_finish)

    def _lost(self, error: str) -> None:
        self.fatal_error = f"engine {self.index} died: {error}"
        for waiting in list(self._answers.values()):  # no answer will come: the askers need not wait it out
            waiting[0].set()
        if self._stopping:
            return
        log.error("%s", self.fatal_error)
        self.on_lost(self, self._take_in_flight())

    def _take_in_flight(self) -> list[Inference]:
        with self._lock:
            in_flight, self._in_flight = list(self._in_flight.values()), {}
        return in_flight


def outstanding_work(inf: Inference) -> int:
    """What a request asks of an engine: its prompt tokens to prefill and its tokens to generate."""
    return len(inf.prompt_ids) + inf.params.max_tokens


def end_stream_and_announce(inf: Inference, on_finish: list) -> None:
    if inf.stream is not None:
        inf.stream.put(None)  # end of stream, after its fields are set
    announce_finished(inf, on_finish)


def fail(inf: Inference, reason: str, error: str, on_finish: list) -> None:
    """End a request whose engine cannot (it is gone): what it was sent so far stands."""
    inf.take_result(Result(inf.id, reason, error, inf.output_ids, inf.logprobs, inf.text, inf.seed, None,
                           inf.first_token_time, inf.token_times, time.perf_counter(), 0, inf.cached_tokens))
    end_stream_and_announce(inf, on_finish)
