"""Engines in processes of their own (serving/), driven through workers' handles as their HTTP threads drive them:
one engine shared by workers, several engines behind a worker's router, peers that are not workers, and an engine
that dies."""
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import socket
import struct
import time
from multiprocessing.connection import Client

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from conftest import request, wait_until
from engine.config import Settings
from serving.client import EngineClient, EngineStalled
from serving.master import Engines, describe_exit
from serving.router import NoEngine, Router


@contextlib.contextmanager
def engines(tiny_model_dir: str, count: int = 1, **settings):
    """`count` engine processes (restarted when they die) and a function that connects a worker's router to them;
    routers and engines are stopped after."""
    settings = dict(model=tiny_model_dir, weights="pretrained", device="cpu", kv_blocks=256, block_size=4,
                    check_invariants=True, engines=count) | settings
    fleet = Engines(Settings(**settings))
    fleet.wait_ready()
    fleet.watch()
    routers = []

    def connect() -> Router:
        router = Router([(p.address, p.authkey) for p in fleet.processes], max_waiting=1024,
                        data_dir=os.environ["DATA_DIR"])
        router.start()
        routers.append(router)
        return router

    try:
        yield fleet, connect
    finally:
        for router in routers:
            router.stop()
        fleet.stop()


def engine_of(router: Router, inf) -> int:
    return router._where[inf.id].index


# ---- one engine, several workers ----

def test_two_workers_share_one_engine_and_each_gets_only_its_own_results(tiny_model_dir):
    with engines(tiny_model_dir) as (fleet, connect):
        first, second = connect(), connect()
        assert first.info["engines"] == 1 and first.clients[0].info["engine-pid"] == fleet.processes[0].process.pid
        assert {"running", "waiting", "kv-cache-usage", "outstanding-tokens"} <= set(first.load())  # before updates
        mine, theirs = request([1, 2, 3], 5), request([4, 5], 7)
        finished = []
        first.on_finish.append(finished.append)
        first.enqueue(mine)
        second.enqueue(theirs)
        assert mine.event.wait(60) and theirs.event.wait(60)
        assert (len(mine.output_ids), len(theirs.output_ids)) == (5, 7) and finished == [mine]
        assert first.stats().snapshot()["requests-finished"] == 2  # the engine counts every worker's


def test_a_worker_that_leaves_has_its_requests_aborted_and_the_others_go_on(tiny_model_dir):
    with engines(tiny_model_dir) as (fleet, connect):
        leaving, staying = connect(), connect()
        abandoned, kept = request([1, 2, 3], 600), request([1, 2, 3], 300)
        leaving.enqueue(abandoned)
        staying.enqueue(kept)
        wait_until(lambda: staying.load()["running"] == 2)
        leaving.stop()
        assert abandoned.event.is_set() and abandoned.finish_reason == "abort"
        assert kept.event.wait(60) and kept.finish_reason == "length" and len(kept.output_ids) == 300
        wait_until(lambda: staying.load()["running"] == 0)


def test_an_idle_worker_still_learns_the_engines_load(tiny_model_dir):
    with engines(tiny_model_dir) as (fleet, connect):
        idle, busy = connect(), connect()
        running = busy.enqueue(request([1, 2, 3], 600))
        wait_until(lambda: idle.load()["running"] == 1)  # from the heartbeats: it has nothing of its own
        busy.abort(running)
        wait_until(lambda: idle.load()["running"] == 0)


def test_stopping_the_engine_aborts_what_is_in_flight_and_says_so(tiny_model_dir):
    with engines(tiny_model_dir) as (fleet, connect):
        router = connect()
        running = router.enqueue(request([1, 2, 3], 1000))
        wait_until(lambda: router.load()["running"] == 1)
        fleet.stop()
        assert running.event.wait(10) and running.finish_reason == "abort"
        wait_until(lambda: not router.alive)  # and then the worker knows no engine serves
        assert "engine 0 died" in router.fatal_error


def hold_a_request_then_wait(addresses: list, started) -> None:
    """A worker, in a process of its own, with a long request in flight (to be killed)."""
    router = Router(addresses, max_waiting=1024, data_dir=os.environ["DATA_DIR"])
    router.start()
    router.enqueue(request([1, 2, 3], 1000))
    started.set()
    time.sleep(600)


def test_the_requests_of_a_worker_killed_without_a_word_count_as_aborted(tiny_model_dir, tmp_path, monkeypatch):
    """No worker is left to count them in /metrics, so the engine does."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # the engines write their metrics there
    with engines(tiny_model_dir) as (fleet, connect):
        watcher = connect()
        forked = multiprocessing.get_context("fork")
        started = forked.Event()
        worker = forked.Process(target=hold_a_request_then_wait,
                                args=([(p.address, p.authkey) for p in fleet.processes], started))
        worker.start()
        assert started.wait(60)
        wait_until(lambda: watcher.load()["running"] == 1)
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        wait_until(lambda: watcher.load()["running"] == 0)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))
        wait_until(lambda: registry.get_sample_value("vllm:request_success_total",
                                                     dict(model_name=tiny_model_dir, policy="dynamic",
                                                          finished_reason="abort")) == 1)


def test_each_question_gets_its_own_answer_when_a_worker_asks_several_in_a_row(tiny_model_dir):
    with engines(tiny_model_dir) as (fleet, connect):
        router = connect()
        assert router.enqueue(request([1, 2], 3)).event.wait(60)
        stats, timeline, stats_again = router.stats().snapshot(), router.timeline_since(), router.stats().snapshot()
        assert stats["requests-finished"] == stats_again["requests-finished"] == 1 and "steps" not in stats
        assert timeline["steps"] and timeline["engine"] == 0 and "requests-finished" not in timeline
        assert router.stats().write_token_csv().endswith(".csv")


def test_a_question_to_an_engine_that_dies_meanwhile_ends_with_its_death(tiny_model_dir):
    with engines(tiny_model_dir) as (fleet, connect):
        client = connect().clients[0]
        engine = fleet.processes[0].process.pid
        os.kill(engine, signal.SIGSTOP)  # the question waits, unanswered
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            asked = pool.submit(client.ask, "stats")
            wait_until(lambda: client._answers)
            os.kill(engine, signal.SIGKILL)
            with pytest.raises(EngineStalled, match="engine 0 died"):  # not "did not answer within 10 s"
                asked.result()


# ---- peers that are not workers ----

def raw_connection(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address)
    return sock


def test_the_engine_keeps_accepting_whatever_peers_do(tiny_model_dir):
    """A peer without the key, one that says nothing, one that sends garbage, one that leaves in the middle of
    the handshake, and one that proves the key and then sends what is not a message: each is dropped, and
    workers connect and are served as before."""
    with engines(tiny_model_dir) as (fleet, connect):
        address, key = fleet.processes[0].address, fleet.processes[0].authkey
        with pytest.raises(multiprocessing.AuthenticationError):
            EngineClient(address, b"not the key", on_lost=lambda *_: None)
        silent = raw_connection(address)
        garbage = raw_connection(address)
        garbage.sendall(struct.pack("!i", 1 << 30) + b"\x00" * 64)
        raw_connection(address).close()  # gone before the handshake
        rogue = Client(address, family="AF_UNIX", authkey=key)
        rogue.send_bytes(b"\x80\x04not a pickle")
        assert connect().enqueue(request([1], 2)).event.wait(60)
        silent.settimeout(30)
        while silent.recv(1024):  # the engine's challenge, then the end: it gave up on the silent peer
            pass
        for sock in (silent, garbage):
            sock.close()
        assert connect().enqueue(request([1], 2)).event.wait(60)
        assert fleet.processes[0].alive and fleet.restarts == 0


# ---- several engines ----

def test_requests_go_to_the_engine_with_the_least_outstanding_work(tiny_model_dir):
    with engines(tiny_model_dir, count=2) as (fleet, connect):
        router = connect()
        assert router.info["engines"] == 2 and len({c.info["engine-pid"] for c in router.clients}) == 2
        long = router.enqueue(request([1, 2, 3], 800))
        short = [router.enqueue(request([4, 5], 6)) for _ in range(3)]
        first = engine_of(router, long)
        assert {engine_of(router, inf) for inf in short} == {1 - first}  # 806 tokens outweigh 3 x 8
        assert all(inf.event.wait(60) and inf.finish_reason == "length" for inf in short)
        router.abort(long)
        assert long.event.wait(60)
        for client in router.clients:  # each engine ran its own share
            assert client.ask("stats").lifetime.finished == (0 if client.index == first else 3)


def test_an_engine_that_dies_takes_only_its_own_requests_and_comes_back(tiny_model_dir):
    """Killed as the kernel's out-of-memory killer or a driver fault would: its stream that had sent text ends
    with an error, its plain request (nothing sent yet) is resubmitted to the other engine, the other engine's
    requests never notice, and the master's new engine serves again."""
    with engines(tiny_model_dir, count=2, stream_interval_ms=0) as (fleet, connect):
        router = connect()
        streamed = request([1, 2, 3], 600)
        streamed.stream = Recorded(streamed)
        router.enqueue(streamed)
        other = router.enqueue(request([1, 2, 3], 1000))
        plain = router.enqueue(request([7, 8], 300))  # 302 + 603 < 1003: beside the stream
        victim = engine_of(router, streamed)
        assert engine_of(router, plain) == victim != engine_of(router, other)
        wait_until(lambda: streamed.stream.texts)
        old_pid = fleet.processes[victim].process.pid
        os.kill(old_pid, signal.SIGKILL)
        assert streamed.event.wait(30) and streamed.finish_reason == "error" and f"engine {victim} died" in \
            streamed.error
        assert plain.event.wait(60) and plain.finish_reason == "length" and len(plain.output_ids) == 300
        assert other.event.wait(60) and other.finish_reason == "length" and len(other.output_ids) == 1000
        assert router.clients[1 - victim].ask("stats").lifetime.finished == 2  # the plain one ran there
        wait_until(lambda: fleet.processes[victim].process.pid != old_pid and router.clients[victim].alive,
                   timeout=60)
        assert fleet.restarts == 1
        assert router.clients[victim].info["engine-pid"] == fleet.processes[victim].process.pid
        again = router.enqueue(request([1], 3))
        assert again.event.wait(60) and again.finish_reason == "length"


def test_an_engine_killed_by_a_signal_is_said_to_be():
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL" and describe_exit(3) == "exit code 3"


def test_a_worker_that_starts_while_an_engine_restarts_reaches_every_engine_or_goes_on_without_it(tiny_model_dir):
    with engines(tiny_model_dir, count=2) as (fleet, connect):
        addresses = [(p.address, p.authkey) for p in fleet.processes]
        old_pid = fleet.processes[1].process.pid
        os.kill(old_pid, signal.SIGKILL)
        fleet.processes[1].process.wait()
        router = connect()  # engine 1 is dead or loading again: a worker gunicorn forks now waits for it
        assert all(c is not None and c.alive for c in router.clients)
        assert router.clients[1].info["engine-pid"] == fleet.processes[1].process.pid != old_pid
        fleet.processes[1].process.kill()
        fleet.processes[1].process.wait()
        impatient = Router(addresses, max_waiting=1024, data_dir=os.environ["DATA_DIR"], connect_timeout_s=0)
        assert impatient.clients[1] is None  # goes on with engine 0, and reaches engine 1 once it is back
        impatient.start()
        assert impatient.enqueue(request([1, 2], 3)).event.wait(60)
        wait_until(lambda: impatient.clients[1] is not None and impatient.clients[1].alive, timeout=60)
        impatient.stop()
        fleet.stop()
        with pytest.raises(NoEngine, match="no engine answered within 1 s"):
            Router(addresses, max_waiting=1024, data_dir=os.environ["DATA_DIR"], connect_timeout_s=1)


def test_engines_default_to_one_per_visible_gpu_and_one_on_a_cpu(monkeypatch):
    from serving.master import engine_devices
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert engine_devices(Settings()) == ["2", "5"]
    assert engine_devices(Settings(engines=1)) == ["2"]
    assert engine_devices(Settings(device="cpu")) == [None]
    assert engine_devices(Settings(device="cpu", engines=2)) == [None, None]
    assert engine_devices(Settings(device="cuda:1")) == [None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert engine_devices(Settings()) == [None]


# ---- streams ----

class Recorded:
    """A stream sink as the worker's HTTP thread sees it: each delta's text and how many tokens it covers."""

    def __init__(self, inf):
        self.inf, self.deltas = inf, []

    @property
    def texts(self) -> list[str]:
        return [text for text, _, _ in self.deltas]

    def put(self, text):
        if text is not None:
            self.deltas.append((text, self.inf.streamed_tokens, len(self.inf.logprobs)))


def streamed(tiny_model_dir, stream_interval_ms: float, tokens: int = 24):
    with engines(tiny_model_dir, stream_interval_ms=stream_interval_ms) as (fleet, connect):
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
