"""gunicorn settings for ./server.sh. One process owns the model: the engine (engine_process.py), which the master
starts before it forks the workers; every worker takes HTTP requests and feeds them to it.

A gthread worker holds one thread per open request for the request's whole life, so THREADS (per worker) bounds
how many requests can be in flight (the original's 8 capped its "dynamic" batch at 8). A thread blocked on a client
that stopped sending its request (or stopped reading its stream) is one fewer for everyone else, so every read
and write on a client's connection gives up after CLIENT_TIMEOUT_S without progress and the connection is
dropped: the listening sockets carry the kernel's receive and send timeouts, which accepted sockets inherit.
A client that trickles a byte at a time within that timeout still holds its thread: THREADS bounds those.

Metrics with several workers: each worker writes its Prometheus metrics to files in PROMETHEUS_MULTIPROC_DIR
(prometheus-client's multiprocess mode) and /metrics adds them up. The directory must be set before anything
imports prometheus_client, so it is set here, in the master, once the server listens, and emptied then:
numbers left by an earlier server would otherwise count again.
"""
import contextlib
import glob
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile

from gunicorn.errors import HaltServer
from gunicorn.workers.gthread import ThreadWorker

HOST, PORT = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8500"))
CLIENT_TIMEOUT_S = float(os.environ.get("CLIENT_TIMEOUT_S", "30"))


class PromptlyClosingThreadWorker(ThreadWorker):
    """gthread with one change: a connection to be closed with nothing unread on it is shut down by the thread
    that served it. gunicorn closes it gracefully, on the worker's main loop: it half-closes and waits up to 2 s
    for the client to close too. A stalled client never does, so each connection dropped for making no progress
    would stall every other connection of the worker for 2 s."""

    def handle(self, conn):
        keep_alive = super().handle(conn)
        if keep_alive is False:
            with contextlib.suppress(OSError):  # already closed or reset: nothing to shut down
                if nothing_unread(conn.sock):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        return keep_alive


def nothing_unread(sock: socket.socket) -> bool:
    """No request bytes wait on sock (those are what gunicorn's graceful close drains, lest the close reset the
    connection before the client has read the answer)."""
    try:
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return True


bind = f"{HOST}:{PORT}"
# Workers share the one engine; each takes about a millisecond of Python per request, so a burst of requests
# reaches the engine sooner when several take them: on a 16-core H200 machine four took 100 requests in 20-30 ms
# (one: 100-170 ms), eight did no better. A quarter of the cores, 1 to 4, leaves the rest to the engine and clients.
workers = int(os.environ.get("WORKERS") or min(4, max(1, (os.cpu_count() or 1) // 4)))
# A worker's threads share one GIL, and a burst of requests passes it between them hundreds of times: each pass
# wakes a thread, on another core unless the worker has a core of its own, where a pass is a switch on one core
# (H200 host, 16 cores, four workers, 100 requests at once: half of them in after 6-11 ms pinned, 9-17 ms not;
# bench/results/h200/pinning).
PIN_WORKERS = os.environ.get("PIN_WORKERS", "auto")
if PIN_WORKERS not in ("auto", "true", "false"):
    sys.exit(f"PIN_WORKERS must be auto, true or false; got {PIN_WORKERS!r}")
worker_class = PromptlyClosingThreadWorker
threads = int(os.environ.get("THREADS", "512"))
worker_connections = threads + 64
backlog = 2048
timeout = int(os.environ.get("WORKER_TIMEOUT", "300"))  # model loading happens before the worker's first heartbeat
graceful_timeout = 15
accesslog = os.environ.get("ACCESS_LOG") or None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms request_id=%({x-request-id}o)s'
loglevel = os.environ.get("LOG_LEVEL", "info")
control_socket_disable = True  # several servers may run side by side (tests, the comparison)

OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def on_starting(server):
    """Fail in one line, before gunicorn's five retries, when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in HOST else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((HOST, PORT))
        except OSError as e:
            server.log.error("cannot listen on %s: %s. Stop what is using it, or choose another port: "
                             "PORT=%d ./server.sh ...", bind, e.strerror, PORT + 1)
            sys.exit(1)


def when_ready(server):
    """Listening: make the metrics directory (only now, so that a server that never listens leaves none behind;
    and before anything imports prometheus_client), then start the engine that the workers forked next feed."""
    if OWN_METRICS_DIR:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="effective-batching-metrics-")
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    for f in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(f)
    from api.server import StartupFailed, start_engine_process
    try:
        start_engine_process()
    except StartupFailed as e:
        server.log.error("%s", e)
        on_exit(server)
        sys.exit(3)  # what gunicorn's own "worker failed to boot" exits with
    timeout = struct.pack("ll", int(CLIENT_TIMEOUT_S), int(CLIENT_TIMEOUT_S % 1 * 1e6))  # struct timeval
    for listener in server.LISTENERS:
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            listener.sock.setsockopt(socket.SOL_SOCKET, option, timeout)
    server.log.error_log.addFilter(OneLineForDroppedConnections())


class OneLineForDroppedConnections(logging.Filter):
    """A timed-out read or write surfaces as EAGAIN, which gunicorn logs as an error with its traceback; a
    client that stalls is no server error, so say it in one line (and keep an attack from flooding the log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BlockingIOError):
            record.msg, record.args = "dropped a connection that made no progress for %g s (CLIENT_TIMEOUT_S)", \
                (CLIENT_TIMEOUT_S,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def pre_fork(server, worker):
    """The engine a new worker will feed runs: a fresh one if the last died (which is why its workers exit); and
    the core the worker will have, if any (one no live worker has)."""
    from api.server import StartupFailed, engine_process_running
    try:
        engine_process_running()
    except StartupFailed as e:
        raise HaltServer(str(e), 3) from e
    taken = {w.cpu for w in server.WORKERS.values()}  # None: a worker left free
    worker.cpu = worker_cpu(os.sched_getaffinity(0), server.num_workers, taken, PIN_WORKERS)


def worker_cpu(allowed: set[int], num_workers: int, taken: set, mode: str) -> int | None:
    """The core to pin a new worker to, or None to leave it free: pinned with PIN_WORKERS=true, and with auto when
    every worker can have a core and two are left (the engine's, and one for the rest)."""
    free = sorted(allowed - taken)
    if mode == "false" or not free or (mode == "auto" and len(allowed) < num_workers + 2):
        return None
    return free[-1]


def post_fork(server, worker):
    """Before the worker starts a thread: every thread it starts inherits the core."""
    if worker.cpu is not None:
        os.sched_setaffinity(0, {worker.cpu})


def post_worker_init(worker):
    from api.server import StartupFailed, start_engine
    try:
        start_engine()
    except StartupFailed as e:
        worker.log.error("%s", e)
        sys.exit(3)  # gunicorn's "worker failed to boot": the master stops too, with this status


def worker_exit(server, worker):
    from api.server import stop_engine
    stop_engine()


def child_exit(server, worker):
    # a dead worker's live gauges (running, waiting, KV usage) must stop counting; its counters stay
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    from api.server import stop_engine_process
    stop_engine_process()  # after the workers: they have left it, their requests answered or aborted
    if OWN_METRICS_DIR and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
