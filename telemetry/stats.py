"""What /stats reports: the original project's figures, kept with their original meaning, and honest ones beside.

Original keys (per finished request: latency = arrival -> finish, num_tokens = tokens requested):
  latency-per-token      mean of latency / num_tokens
  throughput             total tokens / sum of latencies (NOT wall-clock: concurrent requests overlap)
  total-tokens-handled   sum of num_tokens
  total-elapsed-time     sum of latencies
Honest figures come from `metrics.summarize` over the most recent requests: wall-clock output tokens/s over
the busy period (time with at least one request in flight), TTFT, TPOT, E2E percentiles.
"""
import csv
import os
import threading
from collections import defaultdict, deque

from telemetry.latency import RequestRecord, busy_seconds, distribution

RECENT = 10_000  # requests kept for percentiles; the original's sums cover every request


class ServerStats:

    def __init__(self, policy: str, data_dir: str = "data"):
        self.policy = policy
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._recent: deque[RequestRecord] = deque(maxlen=RECENT)
        self._latencies_by_tokens: dict[int, list[float]] = defaultdict(list)
        self.total_tokens = 0
        self.total_latency = 0.0
        self.sum_latency_per_token = 0.0
        self.finished = 0
        self.finish_reasons: dict[str, int] = defaultdict(int)

    def record(self, inf) -> None:
        """Account one finished Inference (engine thread)."""
        with self._lock:
            self.finish_reasons[inf.finish_reason] += 1
            if inf.finish_reason in ("abort", "error"):
                return
            rec = RequestRecord(arrival=inf.arrival_time, first_token=inf.first_token_time, finish=inf.finish_time,
                                prompt_tokens=len(inf.prompt_ids), output_tokens=len(inf.token_times),
                                requested_tokens=inf.params.max_tokens)
            self._recent.append(rec)
            self.finished += 1
            self.total_tokens += rec.requested_tokens
            self.total_latency += rec.e2e
            self.sum_latency_per_token += rec.e2e / rec.requested_tokens
            self._latencies_by_tokens[rec.requested_tokens].append(rec.e2e)

    def snapshot(self) -> dict:
        with self._lock:
            recent = list(self._recent)
            out = {
                "latency-per-token": self.sum_latency_per_token / self.finished if self.finished else 0.0,
                "throughput": self.total_tokens / self.total_latency if self.total_latency else 0.0,
                "total-tokens-handled": self.total_tokens,
                "total-elapsed-time": self.total_latency,
                "requests-finished": self.finished,
                "finish-reasons": dict(self.finish_reasons),
            }
        busy = busy_seconds([(r.arrival, r.finish) for r in recent])
        out_tokens = sum(r.output_tokens for r in recent)
        out.update({
            "wall-clock-throughput": out_tokens / busy if busy else 0.0,
            "busy-time": busy,
            "ttft": distribution([r.ttft for r in recent if r.ttft is not None]),
            "tpot": distribution([r.tpot for r in recent if r.tpot is not None]),
            "e2e-latency": distribution([r.e2e for r in recent]),
        })
        return out

    def write_token_csv(self) -> str:
        """data/token_data_<policy>.csv: num_tokens, mean latency (the original's input to its plot)."""
        os.makedirs(self.data_dir, exist_ok=True)
        path = os.path.join(self.data_dir, f"token_data_{self.policy}.csv")
        with self._lock:
            rows = sorted((n, sum(l) / len(l)) for n, l in self._latencies_by_tokens.items())
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["num_tokens", "latency"])
            w.writerows(rows)
        return path
