"""The live page's demo burst: requests like the client's -- prompts "Request {i}", num_tokens drawn from 1, 25
and 100, launched U(0,1) x wait seconds apart -- enqueued straight into the engine by one background thread, so
that a visitor can watch the batch fill. The page cannot send them itself: a browser opens at most six
connections to a server, which would cap the batch at six.

Nobody waits for these requests; they are served and counted (/stats, /metrics) like any other.
"""
import logging
import random
import threading
import time

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


def start_burst(engine: Engine, requests: int, wait: float) -> None:
    """Launch the burst in the background and return at once."""
    rng = random.Random()
    samples = [(f"Request {i}", rng.choice(NUM_TOKENS_CHOICES), rng.random() * wait) for i in range(requests)]

    def launch() -> None:
        for i, (prompt, num_tokens, gap) in enumerate(samples):
            inf = Inference(prompt, encode(prompt), SamplingParams(max_tokens=num_tokens), request_id=f"demo-{i}")
            try:
                admit([inf], engine.limits, engine.load()["waiting"])
                engine.enqueue(inf)
            except Overloaded:
                log.warning("demo burst: the waiting queue is full; %d requests not sent", len(samples) - i)
                return
            time.sleep(gap)

    threading.Thread(target=launch, name="demo-burst", daemon=True).start()
