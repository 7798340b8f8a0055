"""gunicorn settings for ./server.sh. The engines own the model, one process per GPU (ENGINES; serving/), which the
master starts before it forks the workers and restarts when one dies; every worker takes HTTP requests and feeds
each to the least busy engine.

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

Stopping (SIGTERM to the master, which forwards it to the workers, or to a worker): each worker drains. It keeps
accepting, so that /health can say "draining" and new requests get a 503 that sends them elsewhere, while the
requests it has run on for up to GRACEFUL_TIMEOUT_S; then the app ends those still running with an error (an SSE
error event and [DONE], or a 503), and the worker stops as gunicorn stops one. A second SIGTERM to the master,
SIGQUIT or SIGINT (Ctrl-C) stops at once.
"""
import contextlib
import glob
import logging
import math
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from gunicorn.workers.gthread import DEFAULT_WORKER_DATA_TIMEOUT, ThreadWorker

from engine.config import Settings, env_number


def setting(name: str, default: int | float) -> int | float:
    """A number setting of gunicorn's; a mistyped one stops the server in one line, before it listens."""
    try:
        return env_number(name, default)
    except ValueError as e:
        sys.exit(str(e))


try:
    Settings.from_env()  # the engines' settings, checked as early
except ValueError as e:
    sys.exit(str(e))
HOST, PORT = os.environ.get("HOST", "127.0.0.1"), setting("PORT", 8500)
CLIENT_TIMEOUT_S = setting("CLIENT_TIMEOUT_S", 30.0)
GRACEFUL_TIMEOUT_S = setting("GRACEFUL_TIMEOUT_S", 30.0)
KEEPALIVE_S = setting("KEEPALIVE_S", 75)
STOP_MARGIN_S = 10  # after the drain: ending its last requests, closing kept-alive connections, leaving the engine


class ServingThreadWorker(ThreadWorker):
    """gthread with three changes.

    SIGTERM drains (gunicorn's own stop stops accepting at once and then cuts what still runs): the worker goes
    on accepting while the app refuses new work (api/server.start_draining), and every response from then on
    closes its connection; once no request is left, or GRACEFUL_TIMEOUT_S has passed and the app has ended the
    rest with an error, gunicorn's own stop follows. (A stopping master closes its copies of the listening
    sockets; the workers' copies keep them listening.)

    A connection to be closed with nothing unread on it is shut down by the thread that served it. gunicorn closes
    it gracefully, on the worker's main loop: it half-closes and waits up to 2 s for the client to close too. A
    stalled client never does, so each connection dropped for making no progress would stall every other
    connection of the worker for 2 s.

    A new connection that sends nothing waits on the poller for at most CLIENT_TIMEOUT_S in all (gunicorn would
    keep it for the keep-alive timeout, which is long here)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drain_deadline: float | None = None
        self.serving: set = set()  # the requests being answered (gunicorn's parsed requests)

    def handle_exit(self, sig: int, frame) -> None:
        """SIGTERM. The master forwards to its workers the SIGTERM that may have reached the whole process group
        already, so a second one changes nothing (a quick stop is SIGQUIT)."""
        if not self.booted:  # still starting: nothing to drain
            return super().handle_exit(sig, frame)
        if not self.alive or self.drain_deadline is not None:
            return
        from api.server import start_draining  # imported with the app: nothing is loaded in a signal handler
        self.drain_deadline = time.monotonic() + GRACEFUL_TIMEOUT_S
        start_draining(self.drain_deadline)
        for req in list(self.serving):
            req.must_close = True  # answered with "Connection: close", so that the client goes elsewhere
        self.method_queue.defer(lambda: None)  # wake the main loop, to stop at once if nothing runs

    def handle_request(self, req, conn) -> bool:
        self.serving.add(req)
        try:
            if self.drain_deadline is not None:
                req.must_close = True
            return super().handle_request(req, conn)
        finally:
            self.serving.discard(req)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """The main loop's every turn (at least once a second): the drain ends when nothing runs any more, or at
        its deadline, when the app ends what still runs."""
        super().wait_for_and_dispatch_events(timeout)
        if self.alive and self.drain_deadline is not None and (
                not self.serving or time.monotonic() >= self.drain_deadline):
            self.alive = False  # gunicorn's stop: no more accepting, kept-alive connections closed within 2 s

    def handle(self, conn):
        keep_alive = super().handle(conn)
        if keep_alive is False:
            with contextlib.suppress(OSError):  # already closed or reset: nothing to shut down
                if nothing_unread(conn.sock):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        return keep_alive

    def finish_request(self, conn, fs) -> None:
        super().finish_request(conn, fs)
        if self.pending_conns and self.pending_conns[-1] is conn:  # just put on the poller, having sent nothing
            silent_for = DEFAULT_WORKER_DATA_TIMEOUT  # what its thread waited (the deque stays in timeout order)
            conn.timeout = min(conn.timeout, time.monotonic() + max(0.0, CLIENT_TIMEOUT_S - silent_for))


def nothing_unread(sock: socket.socket) -> bool:
    """No request bytes wait on sock (those are what gunicorn's graceful close drains, lest the close reset the
    connection before the client has read the answer)."""
    try:
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return True


bind = f"{HOST}:{PORT}"
# Workers share the engines; each takes about a millisecond of Python per request, so a burst of requests
# reaches the engines sooner when several take them: on a 16-core H200 machine four took 100 requests in 20-30 ms
# (one: 100-170 ms), eight did no better. A quarter of the cores, 1 to 4, leaves the rest to the engine and clients.
workers = setting("WORKERS", min(4, max(1, (os.cpu_count() or 1) // 4)))
# A worker's threads share one GIL, and a burst of requests passes it between them hundreds of times: each pass
# wakes a thread, on another core unless the worker has a core of its own, where a pass is a switch on one core
# (H200 host, 16 cores, four workers, 100 requests at once: half of them in after 6-11 ms pinned, 9-17 ms not;
# bench/results/h200/pinning).
PIN_WORKERS = os.environ.get("PIN_WORKERS", "auto")
if PIN_WORKERS not in ("auto", "true", "false"):
    sys.exit(f"PIN_WORKERS must be auto, true or false; got {PIN_WORKERS!r}")
worker_class = ServingThreadWorker
threads = setting("THREADS", 512)
worker_connections = threads + 64
backlog = 2048
timeout = setting("WORKER_TIMEOUT", 300)  # model loading happens before the worker's first heartbeat
# The master SIGKILLs workers still running this long after its SIGTERM: never one still ending its requests
graceful_timeout = math.ceil(GRACEFUL_TIMEOUT_S) + STOP_MARGIN_S
# An idle kept-alive connection waits on the worker's poller, not in a thread (gthread's finish_request registers
# it; its next request is handed to a thread when it arrives): a socket and a few objects. worker_connections
# bounds them: a worker keeps worker_connections - THREADS idle (more are answered with "Connection: close") and
# stops accepting at worker_connections. gunicorn's 2 s is shorter than the pools of common clients (aiohttp keeps
# a connection 15 s, httpx 5 s), which would send a request on a connection the server is closing; nginx keeps 75 s.
keepalive = KEEPALIVE_S
accesslog = os.environ.get("ACCESS_LOG") or None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms request_id=%({x-request-id}o)s'
loglevel = os.environ.get("LOG_LEVEL", "info")
control_socket_disable = True  # several servers may run side by side (tests, the comparison)

# The metrics directory this server made, to remove at exit; kept in the environment because a HUP re-reads this
# file, after which PROMETHEUS_MULTIPROC_DIR is set and the directory would look like someone else's
OWN_METRICS_DIR = "EFFECTIVE_BATCHING_METRICS_DIR"


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
    and before anything imports prometheus_client), then start the engines that the workers forked next feed."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[OWN_METRICS_DIR] = tempfile.mkdtemp(
            prefix="effective-batching-metrics-")
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    for f in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(f)
    from api.server import StartupFailed, start_engines
    try:
        start_engines()
    except StartupFailed as e:
        server.log.error("%s", e)
        on_exit(server)
        sys.exit(3)  # what gunicorn's own "worker failed to boot" exits with
    threading.Thread(target=serve_or_stop, args=(server,), name="engine-start", daemon=True).start()
    timeout = struct.pack("ll", int(CLIENT_TIMEOUT_S), int(CLIENT_TIMEOUT_S % 1 * 1e6))  # struct timeval
    for listener in server.LISTENERS:
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            listener.sock.setsockopt(socket.SOL_SOCKET, option, timeout)
    server.log.error_log.addFilter(OneLineForDroppedConnections())
    signal.signal(signal.SIGTERM, sigterm_handler(server))


def serve_or_stop(server) -> None:
    """In a thread of the master's, while the workers already answer (503 "starting"): wait until the engines
    serve; if one cannot, say why in one line and stop the server, which then exits with status 3 (on_exit)."""
    from api.server import StartupFailed, wait_for_engines
    try:
        wait_for_engines()
    except StartupFailed as e:
        server.log.error("%s", e)
        os.kill(os.getpid(), signal.SIGQUIT)  # at once: there is nothing to drain


def sigterm_handler(server) -> Callable[[int, Any], None]:
    """The master's SIGTERM: the first drains the workers (gunicorn's graceful stop), a later one stops them at
    once, as SIGQUIT does: whoever sends it again will not wait."""
    received = []

    def handle(sig: int, frame) -> None:
        server.signal(signal.SIGQUIT if received else sig, frame)
        received.append(sig)
    return handle


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
    """The core the new worker will have, if any (one no live worker has)."""
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
    from api.server import start_engine_soon
    start_engine_soon()


def worker_exit(server, worker):
    from api.server import stop_engine
    stop_engine()


def child_exit(server, worker):
    # a dead worker's live gauges (running, waiting, KV usage) must stop counting; its counters stay
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    from api.server import startup_error, stop_engines
    stop_engines()  # after the workers: they have left them, their requests answered or aborted
    if os.environ.get(OWN_METRICS_DIR):
        shutil.rmtree(os.environ[OWN_METRICS_DIR], ignore_errors=True)
    if startup_error:
        sys.exit(3)  # the engines could not start: as gunicorn's own "worker failed to boot" exits
