"""Clients that stall: one that stops sending its request, or stops reading its stream, is dropped after
CLIENT_TIMEOUT_S, so it cannot hold one of the server's THREADS forever. On a real server with a single thread:
if a stalled client kept it, nobody else would be served."""
import json
import socket
from urllib.parse import urlparse

import pytest
import requests

from conftest import idle_with_every_block_free, running_server, wait_until

LONG_TOKEN = 35496  # 128 bytes of UTF-8 in one token: an echoed prompt of them is large and quick to prefill


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, THREADS=1, CLIENT_TIMEOUT_S=0.5) as url:
        yield url


def connect(url: str, receive_buffer: int | None = None) -> socket.socket:
    u = urlparse(url)
    sock = socket.socket()
    if receive_buffer:  # set before connecting: it bounds the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((u.hostname, u.port))
    return sock


def closed_by_the_server(sock: socket.socket) -> bool:
    sock.settimeout(30)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_clients_that_stop_sending_their_request_are_dropped_and_others_served(url):
    stalled = [connect(url) for _ in range(2)]
    for sock in stalled:
        sock.sendall(b"POST /inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")  # and no more
    assert requests.get(url + "/health", timeout=60).status_code == 200
    assert all(closed_by_the_server(sock) for sock in stalled)


def test_a_body_that_stops_arriving_is_a_408(url):
    sock = connect(url)
    sock.sendall(b'POST /inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100'
                 b'\r\n\r\n{"prompt": ')  # 11 of the 100 bytes
    sock.settimeout(30)
    assert sock.recv(65536).startswith(b"HTTP/1.1 408")
    sock.close()


def test_a_client_that_stops_reading_its_stream_is_dropped_and_its_sequences_aborted(url):
    body = json.dumps({"prompt": [LONG_TOKEN] * 300, "max_tokens": 600, "n": 128, "echo": True, "stream": True,
                       "ignore_eos": True}).encode()  # megabytes of echo at once: more than socket buffers hold
    sock = connect(url, receive_buffer=4096)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # then never reads
    assert requests.get(url + "/health", timeout=60).status_code == 200
    wait_until(lambda: idle_with_every_block_free(url))
    assert requests.get(url + "/stats", timeout=10).json()["finish-reasons"]["abort"] == 128
    sock.close()
