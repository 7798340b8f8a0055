"""Runs in an engine process: `python -m serving.engine_main ADDRESS`, started by serving/master.py, one per GPU.

In one process the engine thread and hundreds of HTTP threads would share one GIL: the engine lets go of it at
every wait for the GPU, then waits its turn behind the request threads (a server on an H200 delivered a third of
its engine's tokens/s that way). So the `BatchingManager`'s steps run alone here, and every HTTP worker of the
server feeds them over a connection of its own (serving/protocol.py says what travels).

The loop exchanges messages with the workers while the device computes a step (`BatchingManager.step`'s
`meanwhile`): what the last step read produced goes out, new requests and aborts come in. Statistics and the
schedule of this engine's requests are kept here, where the requests of every worker meet, and sent on request.
All processes read time.perf_counter (CLOCK_MONOTONIC), so the engine's timestamps are the workers' too.

The engine listens for workers only once its model is built (serving/sockets.py: no peer can stop it from
accepting), and a peer that later sends what is not a message is logged and dropped.
"""
import dataclasses
import gc
import logging
import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing.connection import Client, Connection, wait

from batching import BatchingManager, Inference, Result, make_policy
from serving.protocol import (Abort, Answer, Ask, Bye, Dead, Delta, EngineSpec, Ready, StartFailed, Started, Stop,
                              Submit, Update)
from serving.sockets import Listener
from telemetry.prometheus import EngineMetrics
from telemetry.stats import ServerStats
from telemetry.timeline import Timeline

log = logging.getLogger("effective-batching")

HEARTBEAT_S = 0.05  # the longest a worker's view of the engine's load is behind while it runs
IDLE_WAIT_S = 0.01  # the original's polling period; a message wakes the engine at once anyway


class _Worker:
    """A connected HTTP worker: its requests (by the worker's ids) and what it is owed."""

    def __init__(self, conn: Connection):
        self.conn: Connection | None = conn  # None once the worker is gone
        self.infs: dict[int, Inference] = {}
        self.deltas: list[Delta] = []
        self.results: list[Result] = []
        self.received = 0
        self.leaving = False
        self.last_update = 0.0  # when it was last sent an update


class _Collector:
    """A sequence's stream sink. Its text goes out with a step's update, with how many of its tokens that text
    covers and their logprobs (when asked for): by default each step's token at once, as OpenAI and vLLM stream
    (a token per event); with STREAM_INTERVAL_MS the first text at once (time to first token), then at most every
    `interval` seconds, the rest when the sequence finishes, and between sends the engine does not even cut the
    text (`due`). A worker that falls behind merges what has piled up for a stream into one event
    (api/submission.py): coalescing happens only where the server cannot keep up."""

    def __init__(self, inf: Inference, worker_id: int, worker: _Worker, interval: float):
        self.inf, self.worker_id, self.worker, self.interval = inf, worker_id, worker, interval
        self.sent_logprobs = 0
        self.last_sent = float("-inf")

    def due(self) -> bool:
        return time.monotonic() - self.last_sent >= self.interval

    def put(self, text: str | None) -> None:
        if not text:
            return
        inf = self.inf
        logprobs = inf.logprobs[self.sent_logprobs:inf.streamed_tokens]
        self.sent_logprobs, self.last_sent = inf.streamed_tokens, time.monotonic()
        self.worker.deltas.append((self.worker_id, text, inf.streamed_tokens, logprobs))


def main(address: str) -> None:
    spec: EngineSpec = pickle.loads(sys.stdin.buffer.read())
    settings = spec.settings
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s engine {spec.index}: %(message)s")
    # Ctrl-C and gunicorn's SIGTERM reach the whole process group: the master stops the engines after its workers
    # have left, not the signal before them (and a master that dies closes its connection, which stops them too)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    control = Client(spec.control_address, family="AF_UNIX", authkey=spec.control_key)
    from engine.build import build_runner  # torch and the model: in this process only
    try:
        runner, info = build_runner(settings)
    except Exception as e:  # the master says what failed, in one line
        control.send(StartFailed(f"{type(e).__name__}: {e}"))
        return
    listener = Listener(address, spec.authkey)
    manager = BatchingManager(runner, make_policy(settings.policy, info["max-batch"]), settings.max_step_tokens,
                              max_waiting=1 << 62,  # the workers refuse what does not fit, before sending
                              overlap=info["overlap-steps"], check_invariants=settings.check_invariants)
    manager.attach_timeline(Timeline())
    stats = ServerStats(settings.policy, settings.data_dir)
    manager.attach_stats(stats)
    bm = runner.block_manager
    info = {**info, "engine": spec.index, "engine-pid": os.getpid(), "engine-started": time.time(),
            "block-size": bm.block_size, "kv-blocks-total": bm.num_blocks}
    control.send(Started(info))
    orphans = EngineMetrics(settings.served_model_name or settings.model, settings.policy, settings.prefix_caching)
    gc.freeze()  # the model, torch and the graphs live as long as the engine: a full collection (tens of ms with
    # them in it, a gap in the steps) need not walk them
    EngineLoop(manager, stats, orphans, listener, control, info, settings.stream_interval_ms / 1000).run()


class EngineLoop:

    def __init__(self, manager: BatchingManager, stats: ServerStats, orphans: EngineMetrics, listener: Listener,
                 control: Connection, info: dict, stream_interval_s: float):
        self.manager, self.stats, self.listener, self.control = manager, stats, listener, control
        self.orphans = orphans  # /metrics for the requests of workers that died: nobody else counts them
        self.info, self.stream_interval_s = info, stream_interval_s
        self.workers: list[_Worker] = []
        self.owners: dict[int, tuple[_Worker, int]] = {}  # engine Inference.id -> (its worker, the worker's id)
        self.stopping = False
        manager.on_finish.append(self._finished)
        threading.Thread(target=listener.accept_forever, name="accept", daemon=True).start()

    def run(self) -> None:
        try:
            while not self.stopping:
                # the exchange with the workers runs while the device computes a step: what the last step read
                # produced goes out, and new requests come in, without adding host time to the step
                if self.manager.step(meanwhile=self._exchange):
                    continue
                if not self._exchange() and not self.stopping:  # nothing to run and nothing came in: wait
                    wait([w.conn for w in self.workers if w.conn] + [self.control], IDLE_WAIT_S)
        except BaseException as e:  # a bug in the engine itself: say so to every worker, which fails its requests
            log.exception("the engine died")
            for worker in self.workers:
                self._send(worker, Dead(f"{e!r}"))
            raise SystemExit(1) from e
        self.listener.close()
        self.manager.stop()  # abort what is in flight, and say so
        self._update()

    def _exchange(self) -> int:
        """Send every worker what it is owed, then greet new workers and apply what the workers sent (stopping
        once the master says so, or is gone). Returns how many messages came in."""
        self._update()
        while not self.listener.connected.empty():
            worker = _Worker(self.listener.connected.get())
            self.workers.append(worker)
            self._send(worker, Ready(self.info, {**self.manager.load(), "received": 0}))
        by_conn = {w.conn: w for w in self.workers if w.conn}
        ready = wait([*by_conn, self.control], 0)  # one poll for every connection
        try:
            if self.control in ready and isinstance(self.control.recv(), Stop):
                self.stopping = True
        except (EOFError, OSError):
            self.stopping = True
        taken = 0
        for worker in (by_conn[conn] for conn in ready if conn is not self.control):
            try:
                while worker.conn and worker.conn.poll(0):
                    self._handle(worker, worker.conn.recv())
                    taken += 1
            except (EOFError, OSError):  # the worker is gone without a word
                self._drop(worker)
            except Exception as e:  # not a message: whoever it is, it is not a worker of this server
                log.warning("dropped a connection that sent something else than a message: %r", e)
                self._drop(worker)
        return taken

    def _handle(self, worker: _Worker, message) -> None:
        if isinstance(message, Submit):
            self._submit(worker, message)
        elif isinstance(message, Abort):
            if message.id in worker.infs:
                self.manager.abort(worker.infs[message.id])
        elif isinstance(message, Ask):
            self._send(worker, Answer(message.id, self._answer(message)))
        elif isinstance(message, Bye):
            self._leave(worker)
        else:
            raise TypeError(f"unknown message {type(message).__name__}")

    def _answer(self, ask: Ask):
        if ask.what == "timeline":
            return self.manager.timeline_since(ask.arg or 0, self.info["engine"])
        if ask.what == "stats":
            return self.stats.state()
        raise TypeError(f"unknown question {ask.what!r}")

    def _drop(self, worker: _Worker) -> None:
        worker.conn.close()
        worker.conn = None
        self._leave(worker)

    def _leave(self, worker: _Worker) -> None:
        """The worker is going (or gone): abort its requests; it is let go once their results are sent."""
        worker.leaving = True
        for inf in worker.infs.values():
            self.manager.abort(inf)

    def _submit(self, worker: _Worker, s: Submit) -> None:
        inf = Inference("", s.prompt_ids, s.params, s.request_id, s.cache_salt)
        inf.arrival_time = s.arrival_time
        if s.stream:
            inf.stream = _Collector(inf, s.id, worker, self.stream_interval_s)
        worker.received += 1
        worker.infs[s.id] = inf
        self.owners[inf.id] = (worker, s.id)
        self.manager.enqueue(inf)  # admitted by the worker (batching.admit)

    def _finished(self, inf: Inference) -> None:
        worker, worker_id = self.owners.pop(inf.id)
        worker.infs.pop(worker_id, None)
        if worker.conn is None:  # gone without a word (killed): its aborted requests count here
            self.orphans.record(inf)
        else:
            worker.results.append(dataclasses.replace(inf.result, id=worker_id))

    def _update(self) -> None:
        """Send each worker what it is owed, or at least the load every HEARTBEAT_S; let go of workers that left."""
        now = time.monotonic()
        load = None
        for worker in self.workers:
            if worker.deltas or worker.results or now - worker.last_update > HEARTBEAT_S:
                load = load or self.manager.load()
                self._send(worker, Update(worker.deltas, worker.results, {**load, "received": worker.received}))
                worker.deltas, worker.results, worker.last_update = [], [], now
        for worker in [w for w in self.workers if w.leaving and not w.infs]:
            if worker.conn:
                worker.conn.close()
            self.workers.remove(worker)

    def _send(self, worker: _Worker, message) -> None:
        if worker.conn is None:
            return
        try:
            worker.conn.send(message)
        except OSError:  # the worker is gone
            worker.conn = None
            self._leave(worker)


if __name__ == "__main__":
    from serving import engine_main  # the module's own classes, not copies under __main__, for what arrives pickled
    engine_main.main(sys.argv[1])
