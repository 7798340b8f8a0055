"""A gunicorn config for tests (GUNICORN_CONF): ours, plus a bug planted in the engine: its scheduler raises when
a request for the prompt "die" waits. A real client cannot kill the engine thread (that is the point of the
hardening), so the test that checks what happens when it dies plants the bug this way, in the real server."""
from gunicorn_conf import *  # noqa: F401,F403
import gunicorn_conf


def post_worker_init(worker):
    gunicorn_conf.post_worker_init(worker)
    from api.server import running
    scheduler = running().manager.scheduler
    schedule = scheduler.schedule

    def schedule_or_die():
        if any(inf.prompt == "die" for inf in scheduler.waiting):
            raise RuntimeError("a bug in the engine")
        return schedule()

    scheduler.schedule = schedule_or_die
