"""gunicorn settings for ./server.sh. One worker owns the model; its engine thread starts inside the worker.

A gthread worker holds one thread per open request for the request's whole life, so THREADS bounds how many
requests can be in flight (the original's 8 capped its "dynamic" batch at 8).

Metrics with several workers: each worker writes its Prometheus metrics to files in PROMETHEUS_MULTIPROC_DIR
(prometheus-client's multiprocess mode) and /metrics adds them up. The directory must be set before a worker
imports prometheus_client, so it is set here, in the master, and emptied when the server starts: numbers left
by an earlier server would otherwise count again.
"""
import glob
import os
import shutil
import tempfile

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8500')}"
workers = int(os.environ.get("WORKERS", "1"))  # each worker loads its own copy of the model
worker_class = "gthread"
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
if OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="effective-batching-metrics-")


def on_starting(server):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    for f in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(f)


def post_worker_init(worker):
    from api.server import start_engine
    start_engine()


def worker_exit(server, worker):
    from api.server import stop_engine
    stop_engine()


def child_exit(server, worker):
    # a dead worker's live gauges (running, waiting, KV usage) must stop counting; its counters stay
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
