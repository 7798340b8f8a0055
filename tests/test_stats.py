"""What /stats keeps and writes (telemetry/stats.py), on requests whose timestamps are known: windows, the CSV,
and memory that stays bounded however long the server runs."""
import csv
import tracemalloc
from types import SimpleNamespace

import pytest

from telemetry import stats as stats_module
from telemetry.stats import RECENT, ServerStats


def finished(arrival: float, latency: float, num_tokens: int, reason: str = "length",
             cached_tokens: int = 0) -> SimpleNamespace:
    """What ServerStats reads of a finished Inference."""
    return SimpleNamespace(arrival_time=arrival, first_token_time=arrival + latency / 2, finish_time=arrival + latency,
                           prompt_ids=[1, 2, 3, 4], token_times=[arrival + latency] * num_tokens,
                           params=SimpleNamespace(max_tokens=num_tokens), finish_reason=reason,
                           cached_tokens=cached_tokens)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_original_figures_cover_every_request_since_start_up():
    stats = ServerStats("dynamic")
    for i, (latency, n) in enumerate([(1.0, 10), (3.0, 30)]):
        stats.record(finished(arrival=float(i), latency=latency, num_tokens=n))
    stats.record(finished(arrival=5.0, latency=9.0, num_tokens=50, reason="abort"))
    s = stats.snapshot()
    assert (s["total-tokens-handled"], s["total-elapsed-time"], s["requests-finished"]) == (40, 4.0, 2)
    assert s["throughput"] == pytest.approx(10.0) and s["latency-per-token"] == pytest.approx(0.1)
    assert s["finish-reasons"] == {"length": 2, "abort": 1}


def test_a_window_counts_only_the_requests_that_arrived_since_its_start():
    stats = ServerStats("dynamic")
    stats.record(finished(arrival=1.0, latency=2.0, num_tokens=10))
    stats.record(finished(arrival=4.0, latency=1.0, num_tokens=5))
    stats.record(finished(arrival=6.0, latency=1.0, num_tokens=7, reason="abort"))
    window = stats.snapshot(since=3.0)
    assert (window["requests-finished"], window["total-tokens-handled"], window["since"]) == (1, 5, 3.0)
    assert window["finish-reasons"] == {"length": 1, "abort": 1}
    assert window["e2e-latency"]["mean"] == pytest.approx(1.0)
    assert stats.snapshot()["requests-finished"] == 2


def test_the_csv_holds_the_mean_latency_per_requested_token_count(tmp_path):
    stats = ServerStats("static", str(tmp_path))
    for latency, n in [(1.0, 5), (3.0, 5), (4.0, 20)]:
        stats.record(finished(arrival=0.0, latency=latency, num_tokens=n))
    path = stats.write_token_csv()
    assert read_csv(path) == [{"num_tokens": "5", "latency": "2.0"}, {"num_tokens": "20", "latency": "4.0"}]


def test_the_csv_is_replaced_whole_never_left_half_written(tmp_path, monkeypatch):
    stats = ServerStats("static", str(tmp_path))
    stats.record(finished(arrival=0.0, latency=1.0, num_tokens=5))
    path = stats.write_token_csv()

    real_writer = csv.writer

    class FailingWriter:  # the disk fills up after the header
        def __init__(self, f):
            self.writerow = real_writer(f).writerow

        def writerows(self, rows):
            raise OSError("No space left on device")

    monkeypatch.setattr(stats_module.csv, "writer", FailingWriter)
    stats.record(finished(arrival=0.0, latency=2.0, num_tokens=9))
    with pytest.raises(OSError):
        stats.write_token_csv()
    assert read_csv(path) == [{"num_tokens": "5", "latency": "1.0"}]  # a reader still sees the whole old file
    assert [p.name for p in tmp_path.iterdir()] == ["token_data_static.csv"]  # no temporary file left behind


def test_memory_stays_bounded_however_many_requests_finish():
    stats = ServerStats("dynamic")
    tracemalloc.start()
    for i in range(RECENT):  # the recent records are full from here on
        stats.record(finished(arrival=float(i), latency=1.0, num_tokens=1 + i % 3))
    before, _ = tracemalloc.get_traced_memory()
    for i in range(3 * RECENT):
        stats.record(finished(arrival=float(i), latency=1.0, num_tokens=1 + i % 3))
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 100_000  # bytes: one latency kept per request would be over 1 MB here


def test_prefix_cache_hit_rate_is_over_the_window():
    stats = ServerStats("dynamic")
    stats.record(finished(0.0, 1.0, 4, cached_tokens=0))
    stats.record(finished(5.0, 1.0, 4, cached_tokens=4))
    stats.record(finished(6.0, 1.0, 4, cached_tokens=2))
    assert stats.snapshot()["prefix-cache"] == {"queried-tokens": 12, "hit-tokens": 6, "hit-rate": 0.5}
    assert stats.snapshot(since=5.0)["prefix-cache"] == {"queried-tokens": 8, "hit-tokens": 6, "hit-rate": 0.75}
