"""What /stats reports: the original project's figures, kept with their original meaning, and honest ones beside.

Original keys (per finished request: latency = arrival -> finish, num_tokens = tokens requested):
  latency-per-token      mean of latency / num_tokens
  throughput             total tokens / sum of latencies (NOT wall-clock: concurrent requests overlap)
  total-tokens-handled   sum of num_tokens
  total-elapsed-time     sum of latencies
They cover every request since the server started, as the original's did. Honest figures come from
`latency.summarize`'s definitions over the most recent requests: wall-clock output tokens/s over the busy period
(time with at least one request in flight), TTFT, TPOT, E2E percentiles.

A run measures itself with a window: `snapshot(since=t)` computes every figure over the requests that arrived at
or after server time t (the `server-time` of an earlier /stats), among the last RECENT requests. So other
clients' earlier requests, or an earlier run's, do not count; requests sent concurrently by others still do.
Memory stays bounded: RECENT records, and a count and a sum per requested token count for the CSV.
"""
import csv
import os
import tempfile
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from telemetry.latency import RequestRecord, busy_seconds, distribution

RECENT = 10_000  # requests kept for percentiles and windows; the original's sums cover every request
FAILED = ("abort", "error")  # finish reasons of requests that count in finish-reasons only


@dataclass
class Totals:
    """The sums behind the original figures, and how requests finished."""
    finished: int = 0  # completed: stop or length
    tokens: int = 0
    latency: float = 0.0
    latency_per_token: float = 0.0
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, reason: str, rec: RequestRecord) -> None:
        self.reasons[reason] += 1
        if reason in FAILED:
            return
        self.finished += 1
        self.tokens += rec.requested_tokens
        self.latency += rec.e2e
        self.latency_per_token += rec.e2e / rec.requested_tokens

    def figures(self) -> dict:
        return {
            "latency-per-token": self.latency_per_token / self.finished if self.finished else 0.0,
            "throughput": self.tokens / self.latency if self.latency else 0.0,
            "total-tokens-handled": self.tokens,
            "total-elapsed-time": self.latency,
            "requests-finished": self.finished,
            "finish-reasons": dict(self.reasons),
        }


@dataclass
class StatsState:
    """What a ServerStats holds, to be sent to another process and merged with other engines' (ServerStats.merged)."""
    policy: str
    lifetime: Totals
    recent: list[tuple[str, RequestRecord]]
    latency_by_tokens: dict[int, list]


class ServerStats:

    def __init__(self, policy: str, data_dir: str = "data"):
        self.policy = policy
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._lifetime = Totals()
        self._recent: deque[tuple[str, RequestRecord]] = deque(maxlen=RECENT)  # (finish reason, record)
        self._latency_by_tokens: dict[int, list] = defaultdict(lambda: [0, 0.0])  # num_tokens -> [count, sum]

    def record(self, inf) -> None:
        """Account one finished Inference (engine thread)."""
        rec = RequestRecord(arrival=inf.arrival_time, first_token=inf.first_token_time, finish=inf.finish_time,
                            prompt_tokens=len(inf.prompt_ids), output_tokens=len(inf.token_times),
                            requested_tokens=inf.params.max_tokens, cached_tokens=inf.cached_tokens)
        with self._lock:
            self._lifetime.add(inf.finish_reason, rec)
            self._recent.append((inf.finish_reason, rec))
            if inf.finish_reason not in FAILED:
                by_tokens = self._latency_by_tokens[rec.requested_tokens]
                by_tokens[0] += 1
                by_tokens[1] += rec.e2e

    def state(self) -> StatsState:
        with self._lock:
            lifetime = Totals(**{**vars(self._lifetime), "reasons": defaultdict(int, self._lifetime.reasons)})
            return StatsState(self.policy, lifetime, list(self._recent),
                              {n: list(v) for n, v in self._latency_by_tokens.items()})

    @classmethod
    def merged(cls, states: list[StatsState], data_dir: str) -> "ServerStats":
        """The statistics of several engines' requests as one engine's would be (each engine's lifetime figures
        count from its own start)."""
        stats = cls(states[0].policy, data_dir)
        stats._recent = deque(maxlen=RECENT * len(states))
        for state in states:
            for name in ("finished", "tokens", "latency", "latency_per_token"):
                setattr(stats._lifetime, name, getattr(stats._lifetime, name) + getattr(state.lifetime, name))
            for reason, n in state.lifetime.reasons.items():
                stats._lifetime.reasons[reason] += n
            stats._recent.extend(state.recent)
            for n, (count, total) in state.latency_by_tokens.items():
                stats._latency_by_tokens[n][0] += count
                stats._latency_by_tokens[n][1] += total
        return stats

    def snapshot(self, since: float | None = None) -> dict:
        """Every figure: since start-up, or over the requests that arrived at or after `since` (server time)."""
        with self._lock:
            recent = list(self._recent)
            totals = self._lifetime.figures()
        if since is not None:
            recent = [(reason, rec) for reason, rec in recent if rec.arrival >= since]
            window = Totals()
            for reason, rec in recent:
                window.add(reason, rec)
            totals = {**window.figures(), "since": since}
        completed = [rec for reason, rec in recent if reason not in FAILED]
        busy = busy_seconds([(r.arrival, r.finish) for r in completed])
        prefilled = [rec for _, rec in recent if rec.first_token is not None]
        queried, hits = sum(r.prompt_tokens for r in prefilled), sum(r.cached_tokens for r in prefilled)
        return {
            **totals,
            "wall-clock-throughput": sum(r.output_tokens for r in completed) / busy if busy else 0.0,
            "busy-time": busy,
            "ttft": distribution([r.ttft for r in completed if r.ttft is not None]),
            "tpot": distribution([r.tpot for r in completed if r.tpot is not None]),
            "e2e-latency": distribution([r.e2e for r in completed]),
            # prompt tokens whose KV came from the prefix cache, of the requests that got a token
            "prefix-cache": {"queried-tokens": queried, "hit-tokens": hits,
                             "hit-rate": hits / queried if queried else 0.0},
            "server-time": time.perf_counter(),  # the clock of arrivals: a later ?since= starts here
        }

    def write_token_csv(self) -> str:
        """DATA_DIR/token_data_<policy>.csv: num_tokens, mean latency (the original's input to its plot), over
        every completed request. Written to a temporary file and renamed over the old one, so that a reader, or
        a concurrent /stats, only ever sees a whole file."""
        os.makedirs(self.data_dir, exist_ok=True)
        path = os.path.join(self.data_dir, f"token_data_{self.policy}.csv")
        with self._lock:
            rows = sorted((n, total / count) for n, (count, total) in self._latency_by_tokens.items())
        fd, tmp = tempfile.mkstemp(prefix=f".token_data_{self.policy}.", suffix=".csv", dir=self.data_dir)
        try:
            with os.fdopen(fd, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["num_tokens", "latency"])
                w.writerows(rows)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return path
