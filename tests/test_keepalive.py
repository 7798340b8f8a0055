"""Kept-alive connections on a real server: a pooled client (aiohttp) that pauses between requests, around
gunicorn's old 2 s keep-alive and httpx's 5 s pool, finds its connection still open every time; an idle one waits
on the worker's poller, so it holds none of the THREADS; and a connection that never sends a request is still
dropped after CLIENT_TIMEOUT_S, however long KEEPALIVE_S is."""
import asyncio
import socket
from urllib.parse import urlparse

import aiohttp
import pytest
import requests

from conftest import running_server

TIMEOUT = 120  # generous: nothing here waits on the machine's speed
GAPS_S = [2.0, 1.9, 2.1, 2.0, 5.0, 5.0, 5.0]


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    """One thread: a request in flight on any connection would keep every other one waiting."""
    with running_server("dynamic", tiny_model_dir, THREADS=1, KEEPALIVE_S=600, CLIENT_TIMEOUT_S=1) as url:
        yield url


async def send(session: aiohttp.ClientSession, url: str, i: int) -> None:
    """One request, plain or streamed, read to its end."""
    path, body = [("/v1/completions", {"prompt": "Hi", "max_tokens": 5, "stream": i % 2 == 1}),
                  ("/inference", {"prompt": "Hi", "num_tokens": 5})][i % 2]
    async with session.post(url + path, json=body) as resp:
        assert resp.status == 200
        await resp.read()


def pooled_session(opened: list) -> aiohttp.ClientSession:
    """A session of one connection, reused while the server keeps it open; each connection it opens is appended
    to `opened`."""
    async def on_opened(session, context, params) -> None:
        opened.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_opened)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace],
                                 timeout=aiohttp.ClientTimeout(total=TIMEOUT))


def test_a_pooled_client_keeps_its_connection_across_idle_gaps(url):
    async def run() -> list:
        opened = []
        async with pooled_session(opened) as session:
            await send(session, url, 0)
            for i, gap in enumerate(GAPS_S, start=1):
                await asyncio.sleep(gap)
                await send(session, url, i)  # one on a connection the server was closing would fail
        return opened

    assert len(asyncio.run(run())) == 1  # every request went on the first connection: the server kept it open


def test_an_idle_kept_alive_connection_holds_no_thread(url):
    async def run() -> list:
        opened = []
        async with pooled_session(opened) as session:
            await send(session, url, 0)
            # the server's only thread serves another client while this connection stays open, idle
            other = await asyncio.to_thread(requests.post, url + "/inference", json={"prompt": "Hi", "num_tokens": 3},
                                            timeout=TIMEOUT)
            assert other.status_code == 200
            await send(session, url, 1)
        return opened

    assert len(asyncio.run(run())) == 1


def test_a_connection_that_sends_nothing_is_dropped_after_the_client_timeout(url):
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port)) as silent:
        silent.settimeout(TIMEOUT)  # far shorter than KEEPALIVE_S: only CLIENT_TIMEOUT_S ends it in time
        assert silent.recv(1) == b""
    assert requests.get(url + "/health", timeout=TIMEOUT).status_code == 200
