"""Requests, batching policies and the engine thread.

`Inference` is one request as its client sees it: prompt, sampling parameters, text, stream, and the
`threading.Event` its HTTP thread waits on; the engine runs it as a `Sequence` (token ids, cache and scheduling
state, timestamps) and hands it a `Result` when it finishes. `BatchingManager` owns one engine thread that runs
steps: each step the `Scheduler` picks which sequences run and how many tokens each contributes (a prefill chunk
or one decode token), the model runner does one packed forward and one sampler call, and finished sequences
release their KV blocks and set their Event. On a GPU the steps overlap: step N+1 is scheduled and launched before
step N's tokens are read (`BatchingManager.step`), so the host's work hides behind the GPU's. (The server runs the
same steps in a process of their own, serving/engine_main.py, whose loop calls `step()`; tests and in-process
benchmarks use the thread.)

The three policies of the original project differ only in their admission rule, i.e. when waiting requests
may join the running ones:
  nobatch  one request at a time;
  static   everything waiting forms a batch once, and nothing joins until its longest member is done;
  dynamic  (Orca's iteration-level scheduling) waiting requests join at the next step, up to max_batch.
"""
import bisect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.params import SampledToken, SamplingParams
from engine.prefix import salt_key
from engine.tokenizer import EOT_TOKEN, StreamDecoder
from telemetry.stats import ServerStats
from telemetry.timeline import Timeline

if TYPE_CHECKING:  # the HTTP processes import this module for Inference, and no torch with it
    from engine.runner import LaunchedStep, ModelRunner

log = logging.getLogger(__name__)

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class StreamSink(Protocol):
    def due(self) -> bool: ...  # take the text now? (a sink may send at most every so often: it then says no)

    def put(self, item: str | None) -> None: ...


class Overloaded(RuntimeError):
    """The waiting queue is full (HTTP 503)."""


class TooLong(ValueError):
    """A request that can never run: it needs more tokens than the model's context or the whole KV pool."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class Result:
    """A finished request's account, as its Inference takes it (from its Sequence, or from an engine process)."""
    id: int  # the Inference's
    finish_reason: str
    error: str | None
    output_ids: list[int]
    logprobs: list[SampledToken]
    text: str
    seed: int | None
    scheduled_time: float | None
    first_token_time: float | None
    token_times: list[float]
    finish_time: float
    num_preemptions: int
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache at its first admission


class Inference:
    """One request as its client sees it: its prompt and sampling parameters, the text its tokens spell, the stream
    its reader takes that text from, and the `threading.Event` the seed's interface waits on. The engine runs it as
    a `Sequence` of its own.

    Who writes what: the HTTP thread that makes it (prompt, params, stream); the engine thread, through its
    sequence, the text as tokens come (`take_token`, `stream_delta`: output_ids, logprobs, text, streamed_tokens);
    then, once, the run's account (`take_result`: finish_reason, error, seed, timestamps, num_preemptions) and the
    Event. With the engine in another process, a worker's receiver thread writes the stream's text and the account
    (serving/client.py), and the engine's own Inference wrote the text."""

    _ids = itertools.count()

    def __init__(self, prompt: str, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 cache_salt: str | None = None):
        self.id = next(Inference._ids)
        self.request_id = request_id or f"req-{self.id}"
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.cache_salt = cache_salt  # requests share cached KV blocks only under the same salt (or none)
        self.arrival_time = time.perf_counter()
        self.stream: StreamSink | None = None  # a reader's: put(delta) at steps it is due, put(None) at the end
        self.output_ids: list[int] = []  # the tokens of `text`: not a generated EOS, not those past a stop string
        self.logprobs: list[SampledToken] = []  # one per output id, when asked for
        self.text = ""  # generated text, cut at a stop string
        self._decoder = StreamDecoder()
        self._token_starts: list[int] = []  # where each output token's text starts in `text`
        self._streamed = 0  # characters of `text` handed to the stream so far
        self.streamed_tokens = 0  # output tokens whose text is in the stream so far
        self._stop_reason: str | None = None  # the text's own end: "stop" (EOS, a stop string) or "length"
        self.result: Result | None = None  # the engine's account, once finished
        self.finish_reason: str | None = None  # "length" | "stop" | "abort" | "error"
        self.error: str | None = None
        self.seed = params.seed
        self.scheduled_time: float | None = None  # first admission: arrival -> here is queue time
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.finish_time: float | None = None
        self.num_preemptions = 0
        self.cached_tokens = 0
        self.event = threading.Event()

    @property
    def completion(self) -> str:
        return self.prompt + self.text

    @property
    def done(self) -> bool:
        return self.result is not None

    def take_token(self, sampled: SampledToken) -> str | None:
        """A sampled token's text; returns why the request is finished ("stop", "length"), or None."""
        if sampled.token == EOT_TOKEN and not self.params.ignore_eos:
            self._stop_reason = "stop"
        else:
            self.output_ids.append(sampled.token)
            if self.params.logprobs is not None:
                self.logprobs.append(sampled)
            self._token_starts.append(len(self.text))
            self.text += self._decoder.push(sampled.token)
            if len(self.output_ids) == self.params.max_tokens:
                self._stop_reason = "length"
        if self._stop_reason:
            self.text += self._decoder.flush()  # bytes of an unfinished character, as a replacement character
        self._cut_at_stop_string()
        return self._stop_reason

    def _cut_at_stop_string(self) -> None:
        """Cut the text before the first stop string, and drop the tokens that only spelled the stop string (a
        token straddling its start stays: part of its text is kept)."""
        cuts = [i for i in (self.text.find(s) for s in self.params.stop) if i >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            self._stop_reason = "stop"
            kept = bisect.bisect_left(self._token_starts, len(self.text))
            del self.output_ids[kept:], self.logprobs[kept:], self._token_starts[kept:]

    def stream_delta(self) -> str:
        """Text not yet streamed. While running, hold back what could still turn into a stop string (and the
        tokens that spell it, see `streamed_tokens`)."""
        hold = 0 if self._stop_reason or self.done else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self._streamed, len(self.text) - hold)
        delta, self._streamed = self.text[self._streamed:end], end
        self.streamed_tokens = (len(self.output_ids) if self._stop_reason or self.done
                                else bisect.bisect_left(self._token_starts, end))
        return delta

    def take_result(self, r: Result) -> None:
        """The engine's account of the run, once the request has finished: from its sequence in this process, or
        from an engine process (serving/client.py), whose text comes with it."""
        self.result = r
        self.finish_reason, self.error, self.seed = r.finish_reason, r.error, r.seed
        self.output_ids, self.logprobs, self.text = r.output_ids, r.logprobs, r.text
        self.scheduled_time, self.first_token_time, self.finish_time = r.scheduled_time, r.first_token_time, \
            r.finish_time
        self.token_times, self.num_preemptions, self.cached_tokens = r.token_times, r.num_preemptions, r.cached_tokens


class Sequence:
    """A request as the engine runs it: waiting -> running (-> waiting again if preempted) -> finished. Written by
    the engine thread alone (the scheduler, the model runner, BatchingManager); its tokens' text goes to its
    Inference (`inf`)."""

    def __init__(self, inf: Inference):
        self.inf = inf
        self.id, self.request_id, self.params = inf.id, inf.request_id, inf.params
        self.prompt_ids = inf.prompt_ids
        self.token_ids = list(inf.prompt_ids)  # prompt + generated; the model runner reads it
        self.num_generated = 0  # tokens sampled and read
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_pending = 0  # sampled by a step in flight, not read yet (see BatchingManager.step)
        self.seed = inf.params.seed  # the sampler's key for this request's draws; the runner sets one if None
        self.salt = salt_key(inf.cache_salt)  # where its blocks' hash chain starts (engine/prefix.py)
        self.num_cached_tokens = 0  # of its prompt, found in the prefix cache at its first admission
        self.state = WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.num_preemptions = 0
        self.arrival_time = inf.arrival_time
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.finish_time: float | None = None

    @property
    def done(self) -> bool:
        return self.state == FINISHED

    @property
    def output_ids(self) -> list[int]:
        return self.inf.output_ids

    @property
    def num_unscheduled(self) -> int:
        """Tokens the next step could feed: the rest of a prompt (or of a recompute), else the one last sampled;
        none once the tokens sampled reach max_tokens (the request finishes when the last of them is read)."""
        if self.num_generated + self.num_pending >= self.params.max_tokens:
            return 0
        return len(self.token_ids) + self.num_pending - self.num_computed

    def append(self, sampled: SampledToken, now: float) -> None:
        """Record a sampled token; its text goes to the Inference, which says whether the request is finished."""
        self.first_token_time = self.first_token_time or now
        self.token_times.append(now)
        self.token_ids.append(sampled.token)
        self.num_generated += 1
        self.finish_reason = self.inf.take_token(sampled)

    def account(self) -> Result:
        """The run, as the Inference takes it (Inference.take_result)."""
        inf = self.inf
        return Result(self.id, self.finish_reason, self.error, inf.output_ids, inf.logprobs, inf.text, self.seed,
                      self.scheduled_time, self.first_token_time, self.token_times, self.finish_time,
                      self.num_preemptions, self.num_cached_tokens)


def announce_finished(inf: Inference, on_finish: list) -> None:
    """Tell whoever waits that a request is finished: the on_finish callbacks (statistics), then its Event."""
    for callback in on_finish:
        try:
            callback(inf)
        except Exception:
            log.exception("on_finish callback failed")
    inf.event.set()


@dataclass
class Limits:
    """What a request must fit to be queued (`admit`)."""
    max_context: int  # tokens: the model's context
    block_size: int
    kv_blocks: int  # the whole KV pool (of one engine)
    max_waiting: int  # requests in the waiting queue


def admit(infs: list[Inference], limits: Limits, waiting: int, max_tokens_param: str = "max_tokens") -> None:
    """The one admission check, made before any of a request's sequences is queued (all or none): each fits the
    model's context (vLLM's wording: clients parse it to shrink a request and retry) and the KV pool, however long
    it waited, and the waiting queue, which holds `waiting` requests now, takes them all."""
    for inf in infs:
        prompt, total = len(inf.prompt_ids), len(inf.prompt_ids) + inf.params.max_tokens
        if prompt >= limits.max_context:
            raise TooLong(f"This model's maximum context length is {limits.max_context} tokens. However, your "
                          f"request has {prompt} input tokens. Please reduce the length of the input.", "prompt")
        if total > limits.max_context:
            raise TooLong(f"This model's maximum context length is {limits.max_context} tokens. However, you "
                          f"requested {total} tokens ({prompt} in the prompt, {inf.params.max_tokens} in the "
                          "completion). Please reduce the length of the prompt or completion.", max_tokens_param)
        if -(-total // limits.block_size) > limits.kv_blocks:
            raise TooLong(f"the request needs {total} tokens of KV cache, more than the whole pool holds "
                          f"({limits.kv_blocks * limits.block_size})", max_tokens_param)
    if waiting + len(infs) > limits.max_waiting:
        raise Overloaded(f"{waiting} requests are already waiting and this one brings {len(infs)}; the queue takes "
                         f"{limits.max_waiting} (MAX_WAITING): try again later")


# ---- policies: admission rules only ----

@dataclass
class Policy:
    name: str
    max_batch: int

    def num_to_admit(self, num_active: int) -> int:
        """How many waiting requests may join, given how many are running (or preempted) now."""
        raise NotImplementedError


class NoBatching(Policy):
    def num_to_admit(self, num_active: int) -> int:
        return 0 if num_active else 1


class StaticBatching(Policy):
    def num_to_admit(self, num_active: int) -> int:
        return 0 if num_active else self.max_batch


class DynamicBatching(Policy):
    def num_to_admit(self, num_active: int) -> int:
        return self.max_batch - num_active


POLICIES = {"nobatch": NoBatching, "static": StaticBatching, "dynamic": DynamicBatching}


def make_policy(name: str, max_batch: int = 128) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](name, max_batch)


class Scheduler:
    """Decides each step who runs and with how many tokens, within a token budget and the KV block pool.

    Running sequences go first (decodes, then prefill chunks), each with what it has left to feed
    (`Sequence.num_unscheduled`: with overlapped steps that counts the token still in flight, and nothing once
    the tokens sampled reach max_tokens); when the pool runs dry the most recently admitted sequence is
    preempted: its blocks are freed and it is recomputed from its tokens later, ahead of any new admission.
    Preempted sequences were already admitted, so the policy is not asked again. With prefix caching a sequence
    is admitted after its longest chain of cached blocks (a preempted one finds its own, unless evicted), and the
    blocks each planned chunk fills are named as it is planned, so that a sequence admitted later in the same step
    can share them (engine/kv_cache.py)."""

    def __init__(self, policy: Policy, runner: "ModelRunner", max_step_tokens: int):
        assert max_step_tokens >= policy.max_batch, "the step budget must fit one decode token per sequence"
        self.policy = policy
        self.blocks = runner.block_manager
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.preempted: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.timeline: Timeline | None = None  # set when the schedule is recorded

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_step_tokens
        plan: list[tuple[Sequence, int]] = []
        preemptions_before = self.num_preemptions
        decodes_first = sorted(self.running, key=lambda s: s.num_unscheduled > 1)
        for seq in decodes_first:
            if budget == 0:
                break
            n = min(seq.num_unscheduled, budget)
            if seq.state != RUNNING or n == 0:  # preempted earlier in this loop, or has all its tokens
                continue
            if self._make_room(seq, seq.num_computed + n):
                plan.append((seq, n))
                budget -= n
        self.blocks.cache_scheduled(plan)  # before admissions: a new sequence can share what this step computes
        if self.num_preemptions == preemptions_before:  # the pool is not short: resume, then admit
            budget = self._admit(self.preempted, len(self.preempted), plan, budget)
            if not self.preempted:
                self._admit(self.waiting, self.policy.num_to_admit(len(self.running)), plan, budget)
        return plan

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's blocks to num_tokens, preempting the newest running sequences if needed; False if seq
        itself had to be preempted."""
        while not self.blocks.can_grow(seq.id, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.id, num_tokens)
        return True

    def _admit(self, source: deque, limit: int, plan: list, budget: int) -> int:
        """Move up to `limit` sequences from the head of `source` into running (first come, first served:
        stop at the first that does not fit in the pool), each starting after its cached prefix, and give each a
        first chunk from the budget."""
        for _ in range(min(limit, len(source))):
            seq = source[0]
            if seq.num_pending:  # preempted while a step in flight samples its next token: resumed once it is read
                break
            cached = self.blocks.allocate(seq.id, seq.token_ids, seq.salt)
            if cached is None:
                break
            source.popleft()
            seq.num_computed = cached
            seq.state = RUNNING
            if seq.scheduled_time is None:  # first admission (not a preempted sequence's return)
                seq.scheduled_time = time.perf_counter()
                seq.num_cached_tokens = cached
            if self.timeline:
                self.timeline.admitted(seq, cached)
            self.running.append(seq)
            if budget:
                n = min(seq.num_unscheduled, budget)
                plan.append((seq, n))
                self.blocks.cache_scheduled([(seq, n)])
                budget -= n
        return budget

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.id)
        seq.num_computed = 0
        seq.state = WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.preempted.appendleft(seq)
        if self.timeline:
            self.timeline.preempted(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is and release its blocks."""
        for q in (self.waiting, self.preempted):
            if seq in q:
                q.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq.id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.preempted)

    def check(self) -> None:
        """Raise AssertionError unless the queues are disjoint, each sequence's state matches its queue, and the
        KV blocks are held by exactly the running sequences (kv_cache.BlockManager.check)."""
        queued = [*self.waiting, *self.preempted, *self.running]
        assert len({seq.id for seq in queued}) == len(queued), "a sequence is in two queues, or twice in one"
        for seq in queued:
            expected = RUNNING if seq in self.running else WAITING
            assert seq.state == expected, f"sequence {seq.id} is {seq.state} in the {expected} queue"
            assert 0 <= seq.num_pending <= 1, f"sequence {seq.id} has {seq.num_pending} tokens in flight"
            assert seq.num_computed <= len(seq.token_ids) + seq.num_pending, f"sequence {seq.id} computed too far"
        for seq in (*self.waiting, *self.preempted):
            assert seq.num_computed == 0, f"waiting sequence {seq.id} counts tokens in a cache it has no blocks of"
        self.blocks.check({seq.id for seq in self.running})
        for seq in self.running:
            assert self.blocks.blocks_needed(seq.num_computed) <= len(self.blocks.tables[seq.id]), \
                f"sequence {seq.id} has computed tokens past its blocks"


@dataclass
class _Launched:
    plan: list[tuple[Sequence, int]]
    launched: "LaunchedStep"
    started: float  # when the engine began to schedule it
    named: list[int]  # the KV blocks it computes that were named for the prefix cache when it was planned


class BatchingManager:
    """Owns the engine thread. HTTP threads call `enqueue` and wait on the Inference's Event (or read its
    stream); only the engine thread touches the scheduler, the model and the device."""

    IDLE_SLEEP = 0.01  # seconds, the original's polling period; slept only when there is nothing to run

    def __init__(self, runner: "ModelRunner", policy: Policy, max_step_tokens: int = 2048, max_waiting: int = 1024,
                 on_finish: list | None = None, overlap: bool | None = None, check_invariants: bool = False):
        self.runner = runner
        # after every step, check the bookkeeping (tests; CHECK_INVARIANTS): a broken invariant stops the engine
        self.checks = check_invariants
        self._finished_ids: set[int] = set()  # with checks: every sequence finishes once
        from engine.device import resolve_overlap
        self.overlap = resolve_overlap("auto", runner.device) if overlap is None else overlap
        self._unread: _Launched | None = None  # the step in flight, launched but not read yet
        self.policy = policy
        self.scheduler = Scheduler(policy, runner, max(max_step_tokens, policy.max_batch))
        bm = runner.block_manager
        self.limits = Limits(runner.model.config.block_size, bm.block_size, bm.num_blocks, max_waiting)
        self.statistics: ServerStats | None = None  # set when /stats figures are kept (attach_stats)
        self.on_finish = list(on_finish or [])  # callbacks(inference), run on the engine thread
        self.on_fatal: list = []  # callbacks(error message) when the engine thread dies
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._aborts: list[Sequence] = []
        self._sequences: dict[int, Sequence] = {}  # Inference.id -> its sequence, until it finishes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_step_time = time.monotonic()
        self._last_read = 0.0  # when the last step's results were read
        self.steps = 0
        self.fatal_error: str | None = None
        self.timeline: Timeline | None = None  # set when the schedule is recorded (attach_timeline)

    def attach_timeline(self, timeline: Timeline) -> None:
        """Record the schedule (steps, arrivals, admissions, preemptions, finishes) into `timeline`."""
        self.timeline = self.scheduler.timeline = timeline

    def attach_stats(self, stats: ServerStats) -> None:
        """Account every finished request in `stats` (/stats)."""
        self.statistics = stats
        self.on_finish.append(stats.record)

    # ---- what the HTTP side reads (serving.protocol.Engine) ----

    def stats(self) -> ServerStats:
        return self.statistics

    def timeline_since(self, since: int = 0, engine: int = 0) -> dict:
        return {**self.timeline.snapshot(since), "engine": engine}

    # ---- called from HTTP threads ----

    def enqueue(self, inf: Inference) -> Inference:
        """Queue a request that `admit` let in, as a sequence of the engine's."""
        seq = Sequence(inf)
        with self._lock:
            self._inbox.append(seq)
            self._sequences[inf.id] = seq
        return inf

    def abort(self, inf: Inference) -> None:
        """Stop a request (e.g. its client went away); its blocks return to the pool at the next step."""
        with self._lock:
            seq = self._sequences.get(inf.id)
            if seq is not None:
                self._aborts.append(seq)

    def sequence_of(self, inf: Inference) -> Sequence | None:
        """The engine's sequence of a request it has not finished (for tests and benchmarks that look inside)."""
        return self._sequences.get(inf.id)

    # ---- the engine thread ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the engine thread; it aborts what is in flight as it leaves (only it touches the scheduler)."""
        self._stop.set()
        if self._thread is None:
            self._abort_in_flight()
            return
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            log.warning("the engine thread did not stop within 30 s; leaving it to the process exit")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        log.info("engine thread started: policy=%s max_batch=%d", self.policy.name, self.policy.max_batch)
        try:
            while not self._stop.is_set():
                self.last_step_time = time.monotonic()
                if not self.step():
                    time.sleep(self.IDLE_SLEEP)
        except BaseException as e:  # a bug in the engine itself: say so loudly, fail what is in flight
            log.exception("engine thread died")
            self.fatal_error = f"engine thread died: {e!r}"
            for seq in self._in_flight():
                self._finish(seq, "error", error=self.fatal_error)
            for callback in self.on_fatal:
                callback(self.fatal_error)
            return
        self._abort_in_flight()

    def _abort_in_flight(self) -> None:
        for seq in self._in_flight():
            self._finish(seq, "abort", error="the server is shutting down")

    def step(self, meanwhile: Callable[[], None] | None = None) -> bool:
        """Launch the next step, then read the results of the one before it; False when there was nothing to run
        or read. With `overlap` the host schedules and launches step N+1 while the device still computes step N,
        whose sampled tokens step N+1's decodes take on the device; without, each step is read as soon as it is
        launched. `meanwhile` runs after the results are read, while the device computes the step just launched
        (the engine process answers its workers then), outside the steps' own error handling."""
        try:
            return self._step(meanwhile)
        finally:
            if self.checks:
                self.check_invariants()

    def _step(self, meanwhile: Callable[[], None] | None) -> bool:
        started = time.perf_counter()
        self._take_inbox()
        plan = self.scheduler.schedule()
        launched = self._launch(plan, started) if plan else None
        if self.overlap:
            previous, self._unread = self._unread, launched
            if previous is None and launched is None:
                return False
            if previous is not None:
                self._read(previous)
        elif launched is None:
            return False
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            if not self.overlap:
                self._read(launched)
        return True

    def check_invariants(self) -> None:
        """Raise AssertionError if the engine's bookkeeping is inconsistent: the scheduler's queues and the KV
        block pool (Scheduler.check), and no finished sequence still queued. Called between steps."""
        self.scheduler.check()
        with self._lock:
            inbox, unfinished = list(self._inbox), set(self._sequences)
        queued = {seq.id for seq in self._in_queues()} | {seq.id for seq in inbox}
        assert not queued & self._finished_ids, f"finished sequences {sorted(queued & self._finished_ids)} queued"
        assert not any(seq.done for seq in inbox), "a finished sequence waits in the inbox"
        assert unfinished == queued, f"sequences {sorted(unfinished ^ queued)} neither finished nor queued"

    def _launch(self, plan: list[tuple[Sequence, int]], started: float) -> _Launched | None:
        named = self.runner.block_manager.take_named()  # the blocks this step computes, named as it was planned
        try:
            launched = self.runner.launch(plan)
        except Exception as e:
            self._step_failed(plan, e, named, [])
            return None
        sampling = set(launched.ids)
        for seq, n in plan:
            seq.num_computed += n
            seq.num_pending += seq.id in sampling
        return _Launched(plan, launched, started, named)

    def _read(self, step: _Launched) -> None:
        """Wait for a launched step's sampled tokens and hand them to their sequences."""
        try:
            sampled = step.launched.wait()
        except Exception as e:
            later = self._unread.named if self._unread not in (None, step) else []  # launched after it
            self._step_failed(step.plan, e, step.named, later)
            return
        self.steps += 1
        now = time.perf_counter()
        start = max(step.started, self._last_read)  # steps in flight overlap: each owns the time since the last
        self._last_read = now
        if self.timeline:
            self.timeline.stepped(step.plan, sampled, start, now, self.scheduler, self.runner.block_manager)
        try:
            for seq, _ in step.plan:
                if seq.id in sampled:
                    self._take_token(seq, sampled[seq.id], now)
        finally:
            if self.timeline:
                self.timeline.step_closed()

    def _take_token(self, seq: Sequence, sampled: SampledToken, now: float) -> None:
        seq.num_pending -= 1
        if seq.done:  # finished (a stop, an abort) while this step was in flight: its token is not wanted
            return
        try:  # one sequence's failure (detokenising, stop strings, its stream) ends that sequence only
            seq.append(sampled, now)
            stream = seq.inf.stream
            if seq.finish_reason:
                self._finish(seq, seq.finish_reason)
            elif stream is not None and stream.due():
                stream.put(seq.inf.stream_delta())
        except Exception as e:
            log.exception("request %s failed after its step", seq.request_id)
            if not seq.done:
                self._finish(seq, "error", error=f"inference failed: {e!r}")

    def _step_failed(self, plan: list[tuple[Sequence, int]], e: Exception, named: list[int],
                     later: list[int]) -> None:
        """Fail this step's requests (those not finished while it was in flight), and those that share blocks it
        was to compute (admitted beside it, or since); keep serving the rest. The prefix cache forgets the blocks
        it named, and those the step launched after it (`later`) named from them (BlockManager.forget)."""
        log.exception("step failed for requests %s", [seq.id for seq, _ in plan])
        sharing = self.runner.block_manager.forget(named, later)
        failed = [seq for seq, _ in plan] + [seq for seq in self.scheduler.running if seq.id in sharing]
        for seq in failed:
            if not seq.done:
                self._finish(seq, "error", error=f"inference failed: {e!r}")

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        self.scheduler.waiting.extend(inbox)
        if self.timeline and inbox:
            self.timeline.arrived(inbox)
        for seq in aborts:
            if not seq.done:
                self._finish(seq, "abort")

    def _in_flight(self) -> list[Sequence]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        return inbox + self._in_queues()

    def _in_queues(self) -> list[Sequence]:
        s = self.scheduler
        return list(s.waiting) + list(s.preempted) + list(s.running)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if self.checks:
            assert seq.id not in self._finished_ids, f"sequence {seq.id} finished twice"
            self._finished_ids.add(seq.id)
        self.scheduler.remove(seq)
        seq.finish_reason, seq.error = reason, error
        seq.finish_time = time.perf_counter()
        seq.state = FINISHED
        with self._lock:
            del self._sequences[seq.id]
        if self.timeline:
            self.timeline.finished(seq)
        inf = seq.inf
        inf.take_result(seq.account())
        if inf.stream is not None:
            inf.stream.put(inf.stream_delta())
            inf.stream.put(None)  # end of stream
        announce_finished(inf, self.on_finish)

    def load(self) -> dict:
        """What the engine has on its hands; "outstanding-tokens" is the work left (prompt tokens to prefill,
        tokens to generate) over every request it holds, by which requests are routed to the least busy engine."""
        s, bm = self.scheduler, self.runner.block_manager
        with self._lock:
            inbox = list(self._inbox)
        # copies of the queues first: HTTP threads ask while the engine thread moves sequences between them
        outstanding = sum(len(seq.token_ids) - seq.num_computed + seq.params.max_tokens - seq.num_generated
                          for seq in inbox + self._in_queues())
        return {"running": len(s.running), "waiting": s.num_waiting + len(inbox), "outstanding-tokens": outstanding,
                "kv-cache-usage": bm.usage, "kv-blocks-free": bm.num_free, "kv-blocks-total": bm.num_blocks,
                "preemptions": s.num_preemptions, "steps": self.steps}
