"""The live page's demo burst: requests like the client's -- prompts "Request {i}", num_tokens drawn from 1, 25
and 100, launched U(0,1) x wait seconds apart -- enqueued straight into the engine by one background thread, so
that a visitor can watch the batch fill. The page cannot send them itself: a browser opens at most six
connections to a server, which would cap the batch at six.

Nobody waits for these requests; they are served and counted (/stats, /metrics) like any other. So a burst is
refused up front rather than accepted and dropped: when the waiting queue cannot take it whole right now (503,
like any request that does not fit), and while this worker still sends the one before (409).
"""
import logging
import random
import threading
import time

from api.errors import ApiError
from api.validation import InvalidRequest, reject_unknown, typed
from batching import Inference, Overloaded, admit
from engine.params import SamplingParams
from engine.tokenizer import encode
from serving.protocol import Engine

log = logging.getLogger("effective-batching")

NUM_TOKENS_CHOICES = (1, 25, 100)  # the client's
MAX_REQUESTS = 500
MAX_WAIT_S = 5.0


def parse_burst(body: dict) -> tuple[int, float]:
    """(requests, wait) from `{"requests": 1..MAX_REQUESTS (default 60), "wait": 0..MAX_WAIT_S (default 0.2)}`."""
    reject_unknown(body, {"requests", "wait"})
    requests = typed(body, "requests", (int,), default=60)
    if not 1 <= requests <= MAX_REQUESTS:
        raise InvalidRequest(f"'requests' must be between 1 and {MAX_REQUESTS}; got {requests}", "requests")
    wait = float(typed(body, "wait", (int, float), default=0.2))
    if not 0 <= wait <= MAX_WAIT_S:
        raise InvalidRequest(f"'wait' must be between 0 and {MAX_WAIT_S} seconds; got {wait}", "wait")
    return requests, wait


sending = threading.Lock()  # held while this worker's burst is being sent


def start_burst(engine: Engine, requests: int, wait: float) -> None:
    """Launch the burst in the background and return at once. Raises Overloaded (503) when the waiting queue has
    no room for the whole burst now, ApiError 409 while this worker still sends the burst before."""
    waiting = engine.load()["waiting"]
    room = max(engine.limits.max_waiting - waiting, 0)
    if requests > room:
        raise Overloaded(f"the burst brings {requests} requests and the waiting queue has room for {room} now "
                         f"({waiting} are waiting; MAX_WAITING is {engine.limits.max_waiting}): fire it once the "
                         "queue has drained, or fire fewer")
    rng = random.Random()
    samples = [(f"Request {i}", rng.choice(NUM_TOKENS_CHOICES), rng.random() * wait) for i in range(requests)]
    if not sending.acquire(blocking=False):
        raise ApiError(409, "a demo burst is still being sent, and a server process sends one at a time: fire the "
                            "next once the last request of this one has gone out", code="burst_in_progress")
    try:
        threading.Thread(target=_send, args=(engine, samples), name="demo-burst", daemon=True).start()
    except BaseException:
        sending.release()
        raise


def _send(engine: Engine, samples: list[tuple[str, int, float]]) -> None:
    try:
        for i, (prompt, num_tokens, gap) in enumerate(samples):
            # built as it is sent: a request's arrival time is its construction
            inf = Inference(prompt, encode(prompt), SamplingParams(max_tokens=num_tokens), request_id=f"demo-{i}")
            try:
                admit([inf], engine.limits, engine.load()["waiting"])  # other requests may have filled the queue
                engine.enqueue(inf)
            except Overloaded:
                log.warning("demo burst: the waiting queue is full; %d requests not sent", len(samples) - i)
                return
            time.sleep(gap)
    finally:
        sending.release()
