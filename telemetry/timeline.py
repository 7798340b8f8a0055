"""The engine's schedule, recorded for GET /timeline, the comparison's timeline figure and the live page.

Per step: when it started, how long it took (scheduling, forward and sampling; steps launched while the one before
runs count from the end of that one), its prefill and decode tokens, the tokens it sampled, and the running and
waiting counts and KV-cache usage it ran with. Per request: the phases it went through, each with the time it
began -- waiting, prefill, decoding, preempted (waiting again, its blocks freed), prefill (recomputing), decoding,
finished -- and its prefill chunks (step, tokens). Its admission is its first prefill, its first token its first
decoding. With prefix caching, the prompt tokens found in the cache at its first admission (`cached_tokens`); a
step counts the cached tokens of the requests whose prefill began in it (their first chunk follows that prefix).

Bounded: ring buffers of the last STEPS_KEPT steps and of the REQUESTS_KEPT requests that changed last, so a
server that runs for weeks holds a few MB here. Cheap: only the engine thread writes, one short lock per call; a
step without a request in prefill is recorded in O(1), whatever its batch (decode tokens are counted, not
visited). Readers (HTTP threads) copy under the same lock what changed after a step they name (`since`).

Times are seconds from `origin`, a time.perf_counter() reading (the clock of Inference's timestamps);
`origin_unix` is the wall-clock time of that origin, so that a client can align several servers or a calendar.
"""
import itertools
import threading
import time
from collections import OrderedDict, deque

STEPS_KEPT = 8192  # about 40 s of 5 ms GPU steps, minutes of CPU steps: a whole comparison run
REQUESTS_KEPT = 2048  # more than MAX_BATCH + MAX_WAITING (128 + 1024): every request in flight, and recent ones

WAITING, PREFILL, DECODING, PREEMPTED, FINISHED = "waiting", "prefill", "decoding", "preempted", "finished"
STEP_FIELDS = ("step", "start", "duration", "prefill_tokens", "decode_tokens", "sampled", "running", "waiting",
               "kv_usage", "cached_tokens")


class RequestTrack:
    """One request's schedule. Written by the engine thread under the Timeline's lock."""

    __slots__ = ("id", "request_id", "prompt_tokens", "max_tokens", "phases", "chunks", "preemptions",
                 "finish_reason", "output_tokens", "changed_at", "cached_tokens", "cached_now")

    def __init__(self, inf):
        self.id = inf.id
        self.request_id = inf.request_id
        self.prompt_tokens = len(inf.prompt_ids)
        self.max_tokens = inf.params.max_tokens
        self.phases: list[tuple[float, str]] = [(inf.arrival_time, WAITING)]  # (when it began, phase)
        self.chunks: list[tuple[int, int]] = []  # prefill chunks: (step, tokens)
        self.preemptions = 0
        self.finish_reason: str | None = None
        self.output_tokens: int | None = None
        self.changed_at = 0  # the step during (or before) which this record last changed
        self.cached_tokens: int | None = None  # found in the prefix cache at its first admission
        self.cached_now: int | None = None  # at its latest admission, until its first chunk's step counts them

    def frozen(self) -> tuple:
        """Its fields, copied so that a reader formats them outside the lock while the engine goes on."""
        return (self.id, self.request_id, self.prompt_tokens, self.max_tokens, tuple(self.phases), tuple(self.chunks),
                self.preemptions, self.finish_reason, self.output_tokens, self.cached_tokens)


def request_json(frozen: tuple, origin: float) -> dict:
    """A request's record in /timeline: its fields, and the times of its admission, first token and finish."""
    (id_, request_id, prompt_tokens, max_tokens, phases, chunks, preemptions, finish_reason, output_tokens,
     cached_tokens) = frozen

    def began(phase: str) -> float | None:
        return next((round(t - origin, 6) for t, p in phases if p == phase), None)

    return {"id": id_, "request_id": request_id, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
            "arrival": round(phases[0][0] - origin, 6), "admitted": began(PREFILL), "first_token": began(DECODING),
            "finish": began(FINISHED), "finish_reason": finish_reason, "output_tokens": output_tokens,
            "preemptions": preemptions, "phases": [[round(t - origin, 6), p] for t, p in phases],
            "prefill_chunks": [list(c) for c in chunks], "cached_tokens": cached_tokens}


class Timeline:
    """Ring buffers of steps and requests. The engine calls arrived / admitted / preempted / stepped / finished
    (batching.py); anyone calls snapshot."""

    def __init__(self, steps_kept: int = STEPS_KEPT, requests_kept: int = REQUESTS_KEPT):
        self.origin = time.perf_counter()
        self.origin_unix = time.time()
        self.steps_kept, self.requests_kept = steps_kept, requests_kept
        self.num_steps = 0  # steps recorded so far; the next one is num_steps + 1
        self._steps: deque[tuple] = deque(maxlen=steps_kept)  # STEP_FIELDS, absolute times
        self._requests: OrderedDict[int, RequestTrack] = OrderedDict()  # Inference.id -> track, least recent first
        self._prefilling: dict[int, RequestTrack] = {}  # admitted or resumed, no token sampled since
        self._open_step: tuple | None = None  # the step being recorded, until it is closed
        self._lock = threading.Lock()

    # ---- the engine thread ----

    def arrived(self, infs: list) -> None:
        with self._lock:
            for inf in infs:
                self._track(inf)

    def admitted(self, inf, cached_tokens: int = 0) -> None:
        """Admitted, or resumed after a preemption: its tokens after the first `cached_tokens` (found in the prefix
        cache) are prefilled (again) from now on."""
        now = time.perf_counter()
        with self._lock:
            track = self._track(inf)
            track.phases.append((now, PREFILL))
            if track.cached_tokens is None:
                track.cached_tokens = cached_tokens
            track.cached_now = cached_tokens
            self._prefilling[inf.id] = track

    def preempted(self, inf) -> None:
        now = time.perf_counter()
        with self._lock:
            track = self._track(inf)
            track.phases.append((now, PREEMPTED))
            track.preemptions += 1
            self._prefilling.pop(inf.id, None)

    def stepped(self, plan: list, sampled: dict, start: float, end: float, scheduler, blocks) -> None:
        """One step ran `plan` [(Inference, tokens)] and sampled a token for the ids in `sampled`. Requests in
        prefill get a chunk, and enter decoding when their last chunk produced a token; the rest of the plan
        are decodes of one token each. Readers see the step once it is closed (`step_closed`)."""
        with self._lock:
            step = self.num_steps + 1
            prefill_tokens = prefill_rows = cached_tokens = 0
            if self._prefilling:  # else the plan is not visited: a step of decodes costs the same at any batch
                prefill_tokens, prefill_rows, cached_tokens = self._prefill_chunks(step, plan, sampled, end)
            self._open_step = (step, start, end - start, prefill_tokens, len(plan) - prefill_rows, len(sampled),
                               len(scheduler.running), scheduler.num_waiting, blocks.usage, cached_tokens)

    def step_closed(self) -> None:
        """The step's sequences have taken their tokens, and those that ended have finished: readers see the step
        from now on, with every change it made (so a reader at this step has seen them all)."""
        with self._lock:
            self._steps.append(self._open_step)
            self.num_steps = self._open_step[0]

    def _prefill_chunks(self, step: int, plan: list, sampled: dict, end: float) -> tuple[int, int, int]:
        """Record the chunks of requests in prefill; returns their tokens, how many requests had one, and the
        cached tokens of those whose prefill began here."""
        tokens = rows = cached = 0
        for inf, n in plan:
            track = self._prefilling.get(inf.id)
            if track is None:
                continue
            tokens, rows = tokens + n, rows + 1
            track.chunks.append((step, n))
            if track.cached_now is not None:
                cached += track.cached_now
                track.cached_now = None
            if inf.id in sampled:  # its last chunk: the step ended with its next token
                track.phases.append((end, DECODING))
                del self._prefilling[inf.id]
            self._touch(track)
        return tokens, rows, cached

    def finished(self, inf) -> None:
        with self._lock:
            track = self._track(inf)
            track.phases.append((inf.finish_time, FINISHED))
            track.finish_reason = inf.finish_reason
            track.output_tokens = len(inf.output_ids)
            self._prefilling.pop(inf.id, None)

    def _track(self, inf) -> RequestTrack:
        """The request's track, marked changed; a new one (waiting since its arrival) if unknown or dropped."""
        track = self._requests.get(inf.id)
        if track is None:
            track = self._requests[inf.id] = RequestTrack(inf)
            if len(self._requests) > self.requests_kept:
                _, dropped = self._requests.popitem(last=False)
                self._prefilling.pop(dropped.id, None)
        self._touch(track)
        return track

    def _touch(self, track: RequestTrack) -> None:
        track.changed_at = self.num_steps + 1  # the step in progress: a reader at step num_steps has not seen it
        self._requests.move_to_end(track.id)

    # ---- any thread ----

    def snapshot(self, since: int = 0) -> dict:
        """Steps after step `since`, and requests that changed after it was recorded, as JSON-ready dicts. Pass
        the answer's `step` as the next `since` to get increments: a step's changes (tokens, finishes) are seen
        with it, and nothing comes twice but a change made between steps (an abort while idle), which comes with
        every increment until the next step (clients keep requests by id)."""
        with self._lock:
            now, last = time.perf_counter(), self.num_steps
            since = since if since <= last else 0  # a client of an earlier server (or process): everything
            new_steps = list(itertools.islice(self._steps, max(0, len(self._steps) - (last - since)), None))
            changed = itertools.takewhile(lambda t: t.changed_at > since, reversed(self._requests.values()))
            tracks = [track.frozen() for track in changed]
            first_step = self._steps[0][0] if self._steps else last + 1
        requests = [request_json(track, self.origin) for track in reversed(tracks)]  # least recently changed first
        origin = self.origin
        steps = [dict(zip(STEP_FIELDS, (s[0], round(s[1] - origin, 6), round(s[2], 6), *s[3:8], round(s[8], 4), s[9])))
                 for s in new_steps]
        return {"origin_unix": self.origin_unix, "now": round(now - origin, 6), "step": last, "since": since,
                "first_step": first_step, "steps_kept": self.steps_kept, "requests_kept": self.requests_kept,
                "steps": steps, "requests": requests}
