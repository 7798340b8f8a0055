"""A real server in a child process: `./server.sh POLICY [KEY]` (gunicorn) on a free localhost port, waited for
until /health answers, stopped with its whole process group. The comparison, the HTTP benchmarks and the tests
all start servers this way.

The server never outlives the process that started it: leaving the `with` block stops it, and on Linux the
kernel sends it SIGTERM if that process dies without leaving it (SIGKILL), so no server is left behind
holding a port and memory."""
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.abspath(__file__))
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(policy: str, settings: dict, key: str | None = None, log_path: str | None = None,
                   timeout: float = 300) -> Iterator[tuple[str, dict]]:
    """Yields (base URL, the server's /health answer). `settings` are the server's environment variables
    (MODEL=..., MAX_BATCH=...); a KEY in this process's environment is not passed on: `key` is the server's."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KEY"}
    env.update(HOST="127.0.0.1", PORT=str(port), PYTHON=sys.executable)
    env.update({k: str(v) for k, v in settings.items()})
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "server.log")
        log = stack.enter_context(open(log_path, "w+"))
        proc = subprocess.Popen([os.path.join(ROOT, "server.sh"), policy] + ([key] if key else []), env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                                preexec_fn=_terminate_when_parent_dies if LIBC else None)
        try:
            url = f"http://127.0.0.1:{port}"
            yield url, _wait_until_healthy(url, proc, log, timeout)
        finally:
            _stop(proc)


def _terminate_when_parent_dies() -> None:
    """In the child, before it becomes server.sh (then gunicorn: exec keeps the setting)."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_until_healthy(url: str, proc: subprocess.Popen, log, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerFailed(f"the server exited with code {proc.returncode}; its log ends:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                return json.load(resp)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or still loading the model (503)
        if time.monotonic() > deadline:
            raise ServerFailed(f"no healthy /health at {url} after {timeout:.0f} s; its log ends:\n{_tail(log)}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole group (server.sh, gunicorn, its worker); SIGKILL if it does not stop."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(log, chars: int = 3000) -> str:
    log.seek(0)
    return log.read()[-chars:]
