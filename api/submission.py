"""How an HTTP thread drives its request's sequences through the engine, for /inference and /v1 alike: submit
them all or none, wait for them (or stream their text), and abort whatever the client leaves behind so its KV
blocks return to the pool and it stops costing compute at the next step.

Under WSGI a vanished client shows only when a write fails. A stream writes as tokens come, so a failed write
closes its generator (GeneratorExit) and `release()` runs in its `finally` (sse.py). A plain request writes
nothing until the end, and a stream writes nothing while it waits in the queue, so every POLL_S seconds of
waiting we also peek at the client's socket (gunicorn's gthread worker hands it over as
environ["gunicorn.socket"]): readable with nothing to read means the client closed it. (A client that
half-closes its sending side on purpose would look gone too; HTTP clients don't.)

A server that drains (api/server.py) ends the requests still running at the drain's deadline the same way: the
waiting thread raises a 503, which a stream sends as its error event, and its sequences are aborted.
"""
import logging
import queue
import socket
from dataclasses import dataclass
from typing import Iterator

from batching import Inference, admit
from api.errors import ApiError, ClientGone
from api.server import drain_expired
from serving.protocol import Engine

log = logging.getLogger("effective-batching")

POLL_S = 0.5  # how often a waiting thread checks its client and the engine


def client_closed(sock: socket.socket | None) -> bool:
    if sock is None:  # not under gunicorn (tests with Flask's client): nothing to watch
        return False
    try:
        # socket.socket.recv: the TCP stream itself, also under TLS (SSLSocket.recv refuses flags)
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:  # open, nothing sent: the normal case
        return False
    except OSError:  # reset by the peer
        return True


class _Tagged:
    """One sequence's stream sink: tags the engine's put(delta) / put(None) with the sequence's index, so that all
    sequences of a request feed one queue, and with how many of its tokens that text covers (read on the engine
    thread, as it puts, so the count matches the text)."""

    def __init__(self, shared: queue.SimpleQueue, index: int, inf: Inference):
        self.shared, self.index, self.inf = shared, index, inf

    def due(self) -> bool:
        return True  # every step: the reader takes whatever has come when it gets to it

    def put(self, item: str | None) -> None:
        self.shared.put((self.index, item, self.inf.streamed_tokens))


@dataclass
class Delta:
    index: int  # which of the request's sequences
    text: str
    finish_reason: str | None  # set on a sequence's last delta
    num_tokens: int = 0  # the sequence's output tokens whose text has been sent, this delta included


def raise_if_failed(inf: Inference) -> None:
    if inf.finish_reason == "error":
        raise ApiError(500, inf.error or "inference failed", code="inference_failed")
    if inf.finish_reason == "abort":
        raise ApiError(503, inf.error or "the request was aborted", code="aborted")


class Submission:
    """The sequences of one HTTP request, from enqueue to release."""

    def __init__(self, engine: Engine, infs: list[Inference], sock: socket.socket | None, stream: bool,
                 max_tokens_param: str = "max_tokens"):
        self.engine, self.infs, self.sock = engine, infs, sock
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        if stream:
            for i, inf in enumerate(infs):
                inf.stream = _Tagged(self.queue, i, inf)
        self._check_engine()
        admit(infs, engine.limits, engine.load()["waiting"], max_tokens_param)  # whole, before any is queued
        for i, inf in enumerate(infs):
            try:
                engine.enqueue(inf)
            except Exception:  # all or none: a request must not leave half of its sequences behind
                for queued in infs[:i]:
                    engine.abort(queued)
                raise

    def release(self) -> None:
        """Abort what has not finished (a no-op for finished sequences)."""
        unfinished = [inf for inf in self.infs if not inf.done]
        for inf in unfinished:
            self.engine.abort(inf)
        if unfinished:
            log.info("%s: aborting %d unfinished sequence(s)", self.infs[0].request_id, len(unfinished))

    def wait(self) -> None:
        """Block until every sequence has finished; raises if one failed, the client left or the engine died,
        and then releases the rest."""
        try:
            for inf in self.infs:
                while not inf.event.wait(POLL_S):
                    self._check_client_and_engine()
                raise_if_failed(inf)
        finally:
            self.release()

    def deltas(self) -> Iterator[list[Delta]]:
        """Text as the engine produces it: each time, everything that arrived since the last time (several steps'
        worth when the reader is slower than the engine), one Delta per sequence."""
        remaining = len(self.infs)
        while remaining:
            self._check_drain()  # also while text keeps coming
            try:
                items = [self.queue.get(timeout=POLL_S)]
            except queue.Empty:
                self._check_client_and_engine()
                continue
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            batch: dict[int, Delta] = {}
            for index, text, num_tokens in items:
                delta = batch.setdefault(index, Delta(index, "", None))
                delta.num_tokens = num_tokens
                if text is None:  # the sequence's end
                    raise_if_failed(self.infs[index])
                    delta.finish_reason = self.infs[index].finish_reason
                    remaining -= 1
                else:
                    delta.text += text
            ready = [d for d in batch.values() if d.text or d.finish_reason]
            if ready:
                yield ready

    def _check_engine(self) -> None:
        if self.engine.fatal_error or not self.engine.alive:
            raise ApiError(503, self.engine.fatal_error or "the engine is not running", code="engine_unhealthy")

    def _check_client_and_engine(self) -> None:
        self._check_engine()
        self._check_drain()
        if client_closed(self.sock):
            raise ClientGone()

    @staticmethod
    def _check_drain() -> None:
        if drain_expired():
            raise ApiError(503, "the server is shutting down: this request was still running GRACEFUL_TIMEOUT_S "
                                "after the server was told to stop", code="shutting_down", headers={"Retry-After": "5"})
