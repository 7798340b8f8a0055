"""telemetry/latency.py on inputs whose answers are known by hand: vLLM `bench serve`'s definitions."""
import pytest

from telemetry.latency import RequestRecord, busy_seconds, distribution, summarize


def rec(arrival: float, first_token: float | None, finish: float, output_tokens: int,
        token_times: list[float] | None = None, prompt_tokens: int = 3) -> RequestRecord:
    return RequestRecord(arrival=arrival, first_token=first_token, finish=finish, prompt_tokens=prompt_tokens,
                         output_tokens=output_tokens, token_times=token_times or [])


def test_distribution_gives_mean_and_interpolated_percentiles():
    d = distribution(list(range(1, 102)))  # 1..101: the k-th percentile is 1 + k exactly
    assert d == dict(mean=51.0, p50=51.0, p90=91.0, p99=100.0)


def test_distribution_interpolates_between_samples():
    assert distribution([0.0, 10.0])["p90"] == pytest.approx(9.0)


def test_distribution_of_nothing_is_all_none():
    assert distribution([]) == dict(mean=None, p50=None, p90=None, p99=None)


def test_ttft_e2e_and_tpot_of_one_request():
    r = rec(arrival=10.0, first_token=10.5, finish=12.5, output_tokens=5)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(2.5)
    assert r.tpot == pytest.approx(0.5)  # (E2E - TTFT) / (output tokens - 1) = 2.0 / 4


def test_tpot_is_undefined_for_one_token_or_no_first_token():
    assert rec(0.0, 0.5, 0.5, output_tokens=1).tpot is None
    assert rec(0.0, None, 1.0, output_tokens=0).tpot is None
    assert rec(0.0, None, 1.0, output_tokens=0).ttft is None


def test_itl_is_the_gaps_between_consecutive_tokens():
    assert rec(0.0, 1.0, 4.0, 3, token_times=[1.0, 1.5, 4.0]).itls == pytest.approx([0.5, 2.5])
    assert rec(0.0, 1.0, 1.0, 1, token_times=[1.0]).itls == []


def test_summarize_pools_itl_over_requests_not_per_request_means():
    records = [rec(0.0, 1.0, 4.0, 3, token_times=[1.0, 2.0, 4.0]),  # gaps 1, 2
               rec(0.0, 0.5, 1.0, 2, token_times=[0.5, 1.0])]  # gap 0.5
    s = summarize(records)
    assert s["itl_s"]["mean"] == pytest.approx(3.5 / 3)  # the mean of per-request means would be 1.0
    assert s["itl_s"]["p50"] == pytest.approx(1.0)


def test_summarize_throughput_is_over_first_arrival_to_last_finish():
    records = [rec(1.0, 1.5, 3.0, 10), rec(2.0, 2.5, 5.0, 30)]
    s = summarize(records)
    assert s["requests"] == 2
    assert s["duration_s"] == pytest.approx(4.0)
    assert s["output_tokens"] == 40
    assert s["prompt_tokens"] == 6
    assert s["output_tokens_per_s"] == pytest.approx(10.0)
    assert s["requests_per_s"] == pytest.approx(0.5)
    assert s["ttft_s"]["mean"] == pytest.approx(0.5)
    assert s["e2e_s"]["p50"] == pytest.approx(2.5)


def test_goodput_counts_requests_within_both_slos():
    records = [rec(0.0, 0.5, 1.4, 10),  # TTFT 0.5, TPOT 0.1: good
               rec(0.0, 2.0, 2.9, 10),  # TTFT 2.0: misses the TTFT SLO
               rec(0.0, 0.5, 9.5, 10),  # TPOT 1.0: misses the TPOT SLO
               rec(0.0, 0.8, 0.8, 1)]  # one token: TPOT undefined, judged on TTFT alone: good
    s = summarize(records, slo_ttft=1.0, slo_tpot=0.2)
    assert s["duration_s"] == pytest.approx(9.5)
    assert s["goodput_requests_per_s"] == pytest.approx(2 / 9.5)
    assert s["slo"] == dict(ttft_s=1.0, tpot_s=0.2)


def test_summarize_of_nothing():
    assert summarize([]) == dict(requests=0)


def test_busy_seconds_is_the_union_of_intervals():
    assert busy_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)  # overlap counted once
    assert busy_seconds([(0.0, 10.0), (1.0, 2.0)]) == pytest.approx(10.0)  # nested
    assert busy_seconds([(3.0, 4.0), (0.0, 1.0)]) == pytest.approx(2.0)  # any order
    assert busy_seconds([(0.0, 1.0), (1.0, 2.0)]) == pytest.approx(2.0)  # touching


def test_busy_seconds_of_nothing_is_zero():
    assert busy_seconds([]) == 0.0
