"""Latency and throughput figures of finished requests, with vLLM `bench serve`'s definitions, and the record of a
request they are computed from.

TTFT: arrival -> first output token. TPOT: first -> last output token over output tokens - 1 (the last at finish,
so vLLM's (E2E - TTFT) / (output tokens - 1), unless a plain answer said when its last token came). ITL: gaps
between consecutive tokens, pooled over requests. Throughput: output tokens over wall-clock time. Used by the
server's /stats, by the client and by every benchmark, so all of them report the same thing.
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    """One request, timed on one monotonic clock: the server's (arrival: when it took the request) or a client's
    (arrival: when it sent it). A client's request that failed keeps its error, with its finish when the failure
    came back."""
    arrival: float  # seconds, any monotonic clock shared by the records being summarised
    finish: float
    first_token: float | None = None
    prompt_tokens: int | None = None  # None where the client sent text and the server did not say
    output_tokens: int = 0
    requested_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the server's prefix cache
    token_times: list[float] = field(default_factory=list)  # when each output token was produced (for ITL)
    # When the last token was produced, where a client learns it apart from finish: a plain (not streamed) answer
    # says, in its server-measured latency. None: at finish.
    last_token: float | None = None
    prompt: str | None = None  # the text a client sent,
    completion: str | None = None  # the text it got back,
    error: str | None = None  # or why it got none

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.output_tokens < 2:
            return None
        last = self.finish if self.last_token is None else self.last_token
        return (last - self.first_token) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return np.diff(self.token_times).tolist()


def distribution(values: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 of values (None when there are none)."""
    if len(values) == 0:
        return dict(mean=None, p50=None, p90=None, p99=None)
    a = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return dict(mean=float(a.mean()), p50=float(p50), p90=float(p90), p99=float(p99))


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: wall-clock time with at least one request in flight."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize(records: list[RequestRecord], slo_ttft: float = 1.0, slo_tpot: float = 0.05) -> dict:
    """Every figure the benchmarks report for a set of finished requests. Wall-clock span: first arrival -> last
    finish."""
    if not records:
        return dict(requests=0)
    span = max(r.finish for r in records) - min(r.arrival for r in records)
    out_tokens = sum(r.output_tokens for r in records)
    good = [r for r in records
            if r.ttft is not None and r.ttft <= slo_ttft and (r.tpot is None or r.tpot <= slo_tpot)]
    return dict(
        requests=len(records),
        duration_s=span,
        prompt_tokens=sum(r.prompt_tokens for r in records if r.prompt_tokens is not None),
        output_tokens=out_tokens,
        output_tokens_per_s=out_tokens / span if span > 0 else None,
        requests_per_s=len(records) / span if span > 0 else None,
        goodput_requests_per_s=len(good) / span if span > 0 else None,
        slo=dict(ttft_s=slo_ttft, tpot_s=slo_tpot),
        ttft_s=distribution([r.ttft for r in records if r.ttft is not None]),
        tpot_s=distribution([r.tpot for r in records if r.tpot is not None]),
        itl_s=distribution([x for r in records for x in r.itls]),
        e2e_s=distribution([r.e2e for r in records]),
    )
