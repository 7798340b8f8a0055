"""The engine in its own process, driven through workers' handles as their HTTP threads drive it."""
import contextlib
import multiprocessing

import pytest

from conftest import request, wait_until
from engine.config import Settings
from engine_process import EngineClient, EngineProcess


@contextlib.contextmanager
def engine(tiny_model_dir: str, **settings):
    """An engine process and a function that connects a worker's handle to it (stopped, and stopped, after)."""
    settings = dict(model=tiny_model_dir, weights="pretrained", device="cpu", kv_blocks=256, block_size=4,
                    check_invariants=True) | settings
    process = EngineProcess(Settings(**settings))
    clients = []

    def connect() -> EngineClient:
        client = EngineClient(process.address, process.authkey, max_waiting=1024)
        client.start()
        clients.append(client)
        return client

    try:
        yield process, connect
    finally:
        for client in clients:
            client.stop()
        process.stop()


def test_two_workers_share_one_engine_and_each_gets_only_its_own_results(tiny_model_dir):
    with engine(tiny_model_dir) as (process, connect):
        first, second = connect(), connect()
        assert first.info["engine-pid"] == second.info["engine-pid"] == process.process.pid
        assert {"running", "waiting", "kv-cache-usage", "preemptions"} <= set(first.load())  # before any update
        mine, theirs = request([1, 2, 3], 5), request([4, 5], 7)
        finished = []
        first.on_finish.append(finished.append)
        first.enqueue(mine)
        second.enqueue(theirs)
        assert mine.event.wait(60) and theirs.event.wait(60)
        assert (len(mine.output_ids), len(theirs.output_ids)) == (5, 7) and finished == [mine]
        assert first.ask("stats")["requests-finished"] == 2  # the engine counts every worker's


def test_a_worker_that_leaves_has_its_requests_aborted_and_the_others_go_on(tiny_model_dir):
    with engine(tiny_model_dir) as (process, connect):
        leaving, staying = connect(), connect()
        deaths = []
        leaving.on_fatal.append(deaths.append)
        abandoned, kept = request([1, 2, 3], 600), request([1, 2, 3], 300)
        leaving.enqueue(abandoned)
        staying.enqueue(kept)
        wait_until(lambda: staying.load()["running"] == 2)
        leaving.stop()
        assert abandoned.event.is_set() and abandoned.finish_reason == "abort" and deaths == []
        assert kept.event.wait(60) and kept.finish_reason == "length" and len(kept.output_ids) == 300
        wait_until(lambda: staying.load()["running"] == 0)


def test_an_idle_worker_still_learns_the_engines_load(tiny_model_dir):
    with engine(tiny_model_dir) as (process, connect):
        idle, busy = connect(), connect()
        running = busy.enqueue(request([1, 2, 3], 600))
        wait_until(lambda: idle.load()["running"] == 1)  # from the heartbeats: it has nothing of its own
        busy.abort(running)
        wait_until(lambda: idle.load()["running"] == 0)


def test_stopping_the_engine_aborts_what_is_in_flight_and_says_so(tiny_model_dir):
    with engine(tiny_model_dir) as (process, connect):
        client = connect()
        deaths = []
        client.on_fatal.append(deaths.append)
        running = client.enqueue(request([1, 2, 3], 1000))
        wait_until(lambda: client.load()["running"] == 1)
        process.stop()
        assert running.event.wait(10) and running.finish_reason == "abort"
        wait_until(lambda: not client.alive)  # and then the worker knows its engine is gone
        assert deaths and "engine process died" in deaths[0]


def test_each_question_gets_its_own_answer_when_a_worker_asks_several_in_a_row(tiny_model_dir):
    with engine(tiny_model_dir) as (process, connect):
        client = connect()
        assert client.enqueue(request([1, 2], 3)).event.wait(60)
        stats, timeline, stats_again = client.ask("stats"), client.ask("timeline"), client.ask("stats")
        assert stats["requests-finished"] == stats_again["requests-finished"] == 1 and "steps" not in stats
        assert timeline["steps"] and "requests-finished" not in timeline
        assert client.ask("csv").endswith(".csv")


def test_a_connection_without_the_key_is_refused(tiny_model_dir):
    with engine(tiny_model_dir) as (process, connect):
        with pytest.raises(multiprocessing.AuthenticationError):
            EngineClient(process.address, b"not the key", max_waiting=1024)
        assert connect().enqueue(request([1], 2)).event.wait(60)  # the engine still serves


class Recorded:
    """A stream sink as the worker's HTTP thread sees it: each delta's text and how many tokens it covers."""

    def __init__(self, inf):
        self.inf, self.deltas = inf, []

    def put(self, text):
        if text is not None:
            self.deltas.append((text, self.inf.streamed_tokens, len(self.inf.logprobs)))


def streamed(tiny_model_dir, stream_interval_ms: float, tokens: int = 24):
    with engine(tiny_model_dir, stream_interval_ms=stream_interval_ms) as (process, connect):
        inf = request([1, 2, 3], tokens, logprobs=1)
        inf.stream = Recorded(inf)
        connect().enqueue(inf)
        assert inf.event.wait(60) and inf.finish_reason == "length"
    return inf, inf.stream.deltas


def test_a_stream_gets_its_first_text_at_once_and_the_rest_at_most_every_interval(tiny_model_dir):
    inf, deltas = streamed(tiny_model_dir, stream_interval_ms=60_000)
    assert len(deltas) == 2  # the first text, then everything else with the finish
    first_text, first_tokens, _ = deltas[0]
    assert first_text and first_tokens <= 2  # a character may need two tokens
    assert "".join(text for text, _, _ in deltas) == inf.text
    assert deltas[-1][1:] == (24, 24)  # every token, and its logprob, covered once


def test_with_no_interval_a_stream_gets_text_every_step(tiny_model_dir):
    inf, deltas = streamed(tiny_model_dir, stream_interval_ms=0)
    assert "".join(text for text, _, _ in deltas) == inf.text
    assert len(deltas) >= 12  # a delta per token, but for tokens that end no character
    assert [tokens for _, tokens, _ in deltas] == sorted({tokens for _, tokens, _ in deltas})
