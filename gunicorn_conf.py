"""gunicorn settings for ./server.sh. One worker owns the model; its engine thread starts inside the worker.

A gthread worker holds one thread per open request for the request's whole life, so THREADS bounds how many
requests can be in flight (the original's 8 capped its "dynamic" batch at 8).
"""
import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8500')}"
workers = int(os.environ.get("WORKERS", "1"))  # each worker loads its own copy of the model
worker_class = "gthread"
threads = int(os.environ.get("THREADS", "512"))
worker_connections = threads + 64
backlog = 2048
timeout = int(os.environ.get("WORKER_TIMEOUT", "300"))  # model loading happens before the worker's first heartbeat
graceful_timeout = 15
accesslog = os.environ.get("ACCESS_LOG") or None
loglevel = os.environ.get("LOG_LEVEL", "info")
control_socket_disable = True  # several servers may run side by side (tests, the comparison)


def post_worker_init(worker):
    import app
    app.start_engine()


def worker_exit(server, worker):
    import app
    app.stop_engine()
