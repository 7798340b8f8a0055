"""Three servers behind nginx, run with deploy/nginx.conf: each server on a host of its own (a network namespace,
tests/netns.py), nginx on localhost. Requests spread over the servers; a killed server costs no plain request
(nginx resends it) and leaves no client hanging; a rolling restart under steady traffic loses no request; streams
pass through nginx as they are generated."""
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import requests

import netns
from client import server_process
from conftest import server_stats, wait_until
from test_streaming import events

CONF = f"{server_process.ROOT}/deploy/nginx.conf"
NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")  # Debian's, outside a user's PATH
PORT = 8500  # every server's, each on its own host
TIMEOUT = (5, 120)  # seconds to connect, and between two reads: long enough for a request resent after a kill

SERVER_LINE = re.compile(r"^( *)server \S+( [^;\n]*)?;\n", re.M)
LISTEN_LINE = re.compile(r"^( *)listen \S+;$", re.M)


class Backend:
    """One server on its own host, serving the tiny model on the CPU (as conftest's running_server does); tests stop
    it and start it again."""

    def __init__(self, host: netns.Host, model_dir: str, log: IO[str]):
        self.host, self.log = host, log
        self.settings = {"MODEL": model_dir, "WEIGHTS": "pretrained", "DEVICE": "cpu", "THREADS": "64",
                         "KV_CACHE_GB": "0.2"}
        self.server: server_process.ServerProcess | None = None

    @property
    def address(self) -> str:
        """host:port, as nginx's upstream block and X-Upstream name it."""
        return f"{self.host.address}:{PORT}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        self.server = server_process.start_server("dynamic", self.settings, self.log, host=self.host.address,
                                                  port=PORT, netns=self.host.netns)

    def restart(self) -> None:
        self.start()
        self.server.wait_until_healthy(timeout=120)

    def stop_with(self, sig: int) -> None:
        """Send sig to every process of the server (as systemd stops a service) and wait until all have exited."""
        self.server.signal(sig)
        self.server.wait_exited()

    def stop(self) -> None:
        self.server.stop()


@dataclasses.dataclass
class Cluster:
    url: str  # nginx's
    backends: list[Backend]


def render(conf: str, servers: list[str], listen: str) -> str:
    """deploy/nginx.conf with these servers in its upstream block (each with the first server line's parameters)
    and this listen address; nothing else changes."""
    first = SERVER_LINE.search(conf)
    assert first, "deploy/nginx.conf has no server line"
    indent, parameters = first.group(1), first.group(2) or ""
    ours = "".join(f"{indent}server {server}{parameters};\n" for server in servers)
    conf = conf[:first.start()] + ours + SERVER_LINE.sub("", conf[first.start():])
    conf, listens = LISTEN_LINE.subn(rf"\1listen {listen};", conf)
    assert listens == 1, "deploy/nginx.conf should have one listen line"
    return conf


@contextlib.contextmanager
def running_nginx(directory: Path, servers: list[str]) -> Iterator[str]:
    """nginx with deploy/nginx.conf for these servers, its files in `directory`, on a free localhost port; yields
    its URL. In the foreground (daemon off), so that it is this process's child and stops with it."""
    conf = directory / "nginx.conf"
    port = server_process.free_port()
    with open(CONF) as f:
        conf.write_text(render(f.read(), servers, f"127.0.0.1:{port}"))
    with open(directory / "nginx.out", "w+") as out:
        proc = server_process.start_process([NGINX, "-p", str(directory), "-c", str(conf),
                                             "-e", str(directory / "error.log"), "-g", "daemon off;"], out)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: listening(url, proc, directory))
            yield url
        finally:
            server_process.stop_group(proc)


def listening(url: str, nginx: subprocess.Popen, directory: Path) -> bool:
    assert nginx.poll() is None, f"nginx exited; its log:\n{(directory / 'error.log').read_text()}"
    try:
        requests.get(url + "/health", timeout=5)  # any answer: it may have no server to pass the request to
    except requests.ConnectionError:
        return False
    return True


def skip_without_nginx() -> None:
    if not NGINX:
        pytest.skip("nginx is not installed")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory) -> Iterator[Cluster]:
    skip_without_nginx()
    if reason := netns.unavailable():
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("nginx")
    with contextlib.ExitStack() as stack:
        hosts = stack.enter_context(netns.hosts(3))
        backends = [Backend(host, tiny_model_dir, stack.enter_context(open(directory / f"server{i}.log", "a+")))
                    for i, host in enumerate(hosts)]
        for backend in backends:  # all three load their model at once
            backend.start()
            stack.callback(backend.stop)
        for backend in backends:
            backend.server.wait_until_healthy(timeout=120)
        yield Cluster(stack.enter_context(running_nginx(directory, [b.address for b in backends])), backends)


def complete(url: str, max_tokens: int, headers: dict | None = None) -> requests.Response:
    return requests.post(url + "/v1/completions", json={"prompt": "Request", "max_tokens": max_tokens,
                                                        "ignore_eos": True}, headers=headers, timeout=TIMEOUT)


def is_full_completion(resp: requests.Response, max_tokens: int) -> bool:
    return resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == max_tokens


def answered_by(resp: requests.Response) -> str:
    """host:port of the server that answered (X-Upstream lists those nginx passed over before it)."""
    return resp.headers["X-Upstream"].split(", ")[-1]


def open_stream(url: str, max_tokens: int) -> requests.Response:
    resp = requests.post(url + "/v1/completions", json={"prompt": "Stream", "max_tokens": max_tokens,
                                                        "ignore_eos": True, "stream": True},
                         stream=True, timeout=TIMEOUT)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream"), \
        f"{resp.status_code} {resp.text} (X-Upstream: {resp.headers.get('X-Upstream')})"
    return resp


def stream_ending(resp: requests.Response) -> str:
    """'complete' when the stream ends with [DONE], 'cut' when the connection ends before it."""
    try:
        received = list(events(resp))
    except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError):
        return "cut"
    return "complete" if received[-1:] == ["[DONE]"] else "cut"


def test_requests_spread_over_every_server_and_keep_their_id(cluster):
    answers = [complete(cluster.url, 3, headers={"X-Request-Id": f"spread-{i}"}) for i in range(9)]
    assert all(is_full_completion(r, 3) for r in answers)
    assert {answered_by(r) for r in answers} == {b.address for b in cluster.backends}
    assert [r.headers["X-Request-Id"] for r in answers] == [f"spread-{i}" for i in range(9)]
    assert [r.json()["id"] for r in answers] == [f"cmpl-spread-{i}" for i in range(9)]


def test_a_stream_passes_through_nginx_as_it_is_generated(cluster):
    resp = open_stream(cluster.url, 200)
    received = events(resp)
    next(received)
    server = f"http://{answered_by(resp)}"
    assert server_stats(server)["running"] == 1  # the first tokens came through; the rest is not generated yet
    rest = list(received)
    assert rest[-1] == "[DONE]" and len(rest) > 1  # more text, then [DONE]


def test_a_killed_server_costs_no_plain_request_and_leaves_no_client_hanging(cluster):
    victim = cluster.backends[0]
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        plain = [pool.submit(complete, cluster.url, 200) for _ in range(6)]
        wait_until(lambda: server_stats(victim.url)["running"] > 0)  # a plain request is being generated there
        streams = [open_stream(cluster.url, 100) for _ in range(3)]
        endings = [pool.submit(stream_ending, s) for s in streams]
        victim.stop_with(signal.SIGKILL)
        try:
            answers = [f.result(timeout=300) for f in plain]
            # nginx had sent nothing of a plain answer to its client yet, so it resent it to another server
            assert all(is_full_completion(r, 200) for r in answers)
            assert any(r.headers["X-Upstream"].startswith(victim.address + ", ") for r in answers)
            # a stream had begun: one on the killed server ends cut off, never hangs; the others complete
            for resp, ending in zip(streams, endings):
                assert ending.result(timeout=300) == ("cut" if answered_by(resp) == victim.address else "complete")
            after = [complete(cluster.url, 3) for _ in range(6)]
            assert all(is_full_completion(r, 3) and answered_by(r) != victim.address for r in after)
        finally:
            victim.restart()


def test_a_rolling_restart_under_steady_traffic_loses_no_request(cluster):
    answered, failures, stop = [], [], threading.Event()  # answered: the server of each complete answer

    def plain_client():
        while not stop.is_set():
            try:
                resp = complete(cluster.url, 8)
                if is_full_completion(resp, 8):
                    answered.append(answered_by(resp))
                else:
                    failures.append(f"{resp.status_code} {resp.text} (X-Upstream: {resp.headers.get('X-Upstream')})")
            except requests.RequestException as e:
                failures.append(repr(e))

    def streaming_client():
        while not stop.is_set():
            try:
                resp = open_stream(cluster.url, 8)
                if stream_ending(resp) == "complete":
                    answered.append(answered_by(resp))
                else:
                    failures.append(f"a stream from {answered_by(resp)} was cut off")
            except (requests.RequestException, AssertionError) as e:
                failures.append(repr(e))

    def answered_since(count: int) -> list[str]:
        assert not failures, failures[:5]  # at once, with what went wrong
        return answered[count:]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        clients = [pool.submit(plain_client), pool.submit(plain_client), pool.submit(streaming_client)]
        try:
            for backend in cluster.backends:
                backend.stop_with(signal.SIGTERM)
                away = len(answered)
                wait_until(lambda: len(answered_since(away)) >= 5, timeout=120)  # served while the server is away
                backend.restart()
                back = len(answered)
                # nginx passes it requests again fail_timeout after it last failed one; the next server may stop
                # only then (deploy/nginx.conf, "rolling restart")
                wait_until(lambda: backend.address in answered_since(back), timeout=120)
        finally:
            stop.set()
            for client in clients:
                client.result(timeout=300)
    assert not failures


def test_nginx_answers_its_own_errors_in_the_api_error_shape(tmp_path):
    skip_without_nginx()
    with running_nginx(tmp_path, [f"127.0.0.1:{server_process.free_port()}"]) as url:  # nothing listens there
        no_server = complete(url, 3)
        too_large = requests.post(url + "/v1/completions", data=b"x" * ((1 << 20) + 1),
                                  headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert no_server.status_code == 502 and no_server.json()["error"]["code"] == "no_server"
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "body_too_large"
    assert set(too_large.json()["error"]) == {"message", "type", "param", "code"}
