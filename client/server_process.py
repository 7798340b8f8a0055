"""A real server in a child process: `./server.sh POLICY [KEY]` (gunicorn) on a free localhost port, waited for
until /health answers, stopped with its whole process group. It lives with the client because the comparison
that users run (client/experiment.py) starts its servers this way; the HTTP benchmarks (bench/server.py) and the
tests start theirs with it too.

The server never outlives the process that started it: leaving the `with` block stops it, and on Linux the
kernel sends it SIGTERM if that process dies without leaving it (SIGKILL), so no server is left behind
holding a port and memory.

`running_server` is the whole life of one server; `start_server` gives the running process itself, for those that
signal a server, wait for it to exit and start it again (on an address of its own, even in another network
namespace: the load-balancer tests)."""
import contextlib
import ctypes
import dataclasses
import glob
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
from typing import IO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: server.sh
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ServerProcess:
    """A started `./server.sh`: gunicorn (server.sh execs it), leader of its own process group, which holds the
    workers and the engine process too."""
    url: str
    proc: subprocess.Popen
    log: IO[str]

    def wait_until_healthy(self, timeout: float = 300) -> dict:
        """The server's /health answer, once it gives one."""
        return _wait_until_healthy(self.url, self.proc, self.log, timeout)

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole server: gunicorn, its workers and the engine process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def wait_exited(self, timeout: float = 60) -> None:
        """Wait until every process of the server has exited (so its port is free for the next one)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or _live_members(self.proc.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server (process group {self.proc.pid}) still runs after {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_group(self.proc)


def start_server(policy: str, settings: dict, log: IO[str], key: str | None = None, host: str = "127.0.0.1",
                 port: int | None = None, netns: str | None = None) -> ServerProcess:
    """Start `./server.sh POLICY [KEY]` on host:port (a free localhost port by default), in the network namespace
    `netns` if one is given (`ip netns exec`, which execs: the server is still this process's child), writing its
    output to `log`. Returns at once; see running_server for `settings` and `key`."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if k != "KEY"}
    env.update(HOST=host, PORT=str(port), PYTHON=sys.executable)
    env.update({k: str(v) for k, v in settings.items()})
    argv = [os.path.join(ROOT, "server.sh"), policy] + ([key] if key else [])
    proc = start_process((["ip", "netns", "exec", netns] if netns else []) + argv, log, env)
    return ServerProcess(f"http://{host}:{port}", proc, log)


@contextlib.contextmanager
def running_server(policy: str, settings: dict, key: str | None = None, log_path: str | None = None,
                   timeout: float = 300) -> Iterator[tuple[str, dict]]:
    """Yields (base URL, the server's /health answer). `settings` are the server's environment variables
    (MODEL=..., MAX_BATCH=...); a KEY in this process's environment is not passed on: `key` is the server's."""
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "server.log")
        server = start_server(policy, settings, stack.enter_context(open(log_path, "w+")), key)
        try:
            yield server.url, server.wait_until_healthy(timeout)
        finally:
            server.stop()


def start_process(argv: list[str], log: IO[str], env: dict | None = None) -> subprocess.Popen:
    """Start argv in the checkout, output to `log`, in a session (and process group) of its own, to be stopped with
    stop_group. On Linux it gets SIGTERM when the thread that started it ends, so start it from one that lives as
    long as this process (the main thread)."""
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                            preexec_fn=_terminate_when_parent_dies if LIBC else None)


def _terminate_when_parent_dies() -> None:
    """In the child, before it execs (server.sh, then gunicorn: exec keeps the setting)."""
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


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to proc's whole process group (for a server: server.sh, gunicorn, its workers); SIGKILL if it does
    not stop."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _live_members(pgid: int) -> list[int]:
    """The processes of group pgid that still run (Linux; none elsewhere). Zombies do not count: a killed server's
    workers are orphans that only their new parent can reap, and where that is a container's first process it
    may never do so."""
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            with open(stat) as f:
                fields = f.read().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] != "Z":  # after the name: state, ppid, pgrp
                members.append(int(stat.split("/")[2]))
    return members


def _tail(log, chars: int = 3000) -> str:
    log.seek(0)
    return log.read()[-chars:]
