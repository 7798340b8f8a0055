"""Async HTTP load: every request is sent at its arrival offset, whatever the server's state (open loop), and timed
on the client's clock.

When the server streams (`"stream": true` answered with `text/event-stream`: `data: {"text", "finish_reason"}`
events, then `data: [DONE]`), each event that carries text is a token's arrival, so TTFT and ITL are measured
as the client sees them. Otherwise each request gets one JSON response: TTFT is its `ttft` field (the server's
arrival -> first token), E2E is the client's, and there is no ITL.

HTTP/1.1 on asyncio's streams, written here rather than taken from a client library: a burst of a hundred
requests is a third of a second of GPU work, and a general-purpose async client spends 10-20 ms of Python
building and sending them (measured on the development CPU: the first request reached the server 11-18 ms after
the client began), time that would be timed as the server's. Here a request's bytes are made before the clock
starts, so sending one is a socket write (about 25 us), and a stream is read chunk by chunk as it arrives.
"""
import asyncio
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from tqdm import tqdm

from bench.workloads import Request, as_text
from telemetry.latency import RequestRecord, summarize


@dataclass
class Load:
    records: list[RequestRecord]
    errors: list[str]
    streaming: bool

    def outcome(self, **slo) -> dict:
        """A result row's fields: the metrics.summarize figures (slo: slo_ttft, slo_tpot), or an error when no
        request succeeded."""
        fields = dict(streaming=self.streaming, failed=len(self.errors), errors=self.errors[:3])
        if not self.records:
            return fields | dict(error=f"no request succeeded: {self.errors[:1]}")
        return fields | dict(metrics=summarize(self.records, **slo))


def run_load(url: str, requests: list[Request], desc: str | None = None) -> Load:
    """Send the requests to `url`/inference at their arrival offsets; one record per successful request."""
    return asyncio.run(_run_load(url, requests, desc))


async def _run_load(url: str, requests: list[Request], desc: str | None) -> Load:
    server = Server(url)
    try:
        streaming = await supports_streaming(server)
        send = _send_streaming if streaming else _send_plain
        messages = [server.post_message("/inference", dict(prompt=as_text(r.prompt_ids), num_tokens=r.output_len,
                                                           temperature=0, ignore_eos=True, stream=streaming or None))
                    for r in requests]
        await server.open_connections(sum(r.arrival < 1.0 for r in requests))
        records, errors = [], []
        start = time.perf_counter()
        with tqdm(total=len(requests), desc=desc, unit="req", leave=False) as bar:

            async def one(request: Request, message: bytes) -> None:
                await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
                try:
                    records.append(await send(server, message, request))
                except Exception as e:
                    errors.append(repr(e)[:300])
                bar.update()

            await asyncio.gather(*(one(r, m) for r, m in zip(requests, messages)))
    finally:
        server.close()
    return Load(records, errors, streaming)


class Server:
    """One HTTP/1.1 server and a pool of kept-alive connections to it."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def post_message(self, path: str, body: dict) -> bytes:
        """The bytes of a POST of `body` as JSON (fields that are None left out)."""
        data = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode() + data

    async def open_connections(self, n: int) -> None:
        """Open n connections before the clock starts, for the requests sent at once: a client that keeps its
        connections (a proxy, an SDK's pool) pays no connect per request. (gunicorn keeps an idle connection for
        2 s, so only the first second's requests get one.)"""
        self._idle += await asyncio.gather(*(asyncio.open_connection(self.host, self.port)
                                             for _ in range(n - len(self._idle))))

    async def exchange(self, message: bytes) -> "Response":
        """Send one request, on an idle connection if one is still open, and read the response's head."""
        while self._idle:
            if response := await self._exchange_on(*self._idle.pop(), message):
                return response
        if response := await self._exchange_on(*await asyncio.open_connection(self.host, self.port), message):
            return response
        raise ConnectionError("the server closed the connection without answering")

    async def _exchange_on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           message: bytes) -> "Response | None":
        """None when the connection turns out closed (the server lets idle ones go) before an answer began."""
        writer.write(message)
        try:
            status_line = await reader.readline()
        except ConnectionResetError:
            status_line = b""
        if not status_line:
            writer.close()
            return None
        version, status, _ = status_line.decode("latin-1").split(" ", 2)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, value = line.decode("latin-1").split(":", 1)
            headers[name.strip().lower()] = value.strip()
        return Response(self, reader, writer, int(status), headers,
                        keep_alive=version == "HTTP/1.1" and headers.get("connection", "").lower() != "close")

    def keep(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection whose last response was read to its end, for the next request."""
        self._idle.append((reader, writer))

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle = []


class Response:
    """A response whose head is read; its body is read with `chunks` (as it arrives) or `read`."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                 headers: dict[str, str], keep_alive: bool):
        self.server, self.reader, self.writer = server, reader, writer
        self.status, self.headers, self.keep_alive = status, headers, keep_alive
        self.content_type = headers.get("content-type", "").split(";")[0].strip()

    async def chunks(self):
        """The body in pieces as the server sent them; at its end the connection goes back to the pool (or is
        closed, as it is when the body is not read to its end)."""
        finished = False
        try:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                while size := int((await self.reader.readline()).split(b";")[0], 16):
                    yield await self.reader.readexactly(size)
                    await self.reader.readexactly(2)  # the chunk's CRLF
                await self.reader.readline()  # the CRLF after the last chunk (no trailers)
            elif "content-length" in self.headers:
                yield await self.reader.readexactly(int(self.headers["content-length"]))
            else:
                self.keep_alive = False
                yield await self.reader.read()  # until the server closes
            finished = True
        finally:
            if finished and self.keep_alive:
                self.server.keep(self.reader, self.writer)
            else:
                self.writer.close()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


async def supports_streaming(server: Server) -> bool:
    """True when /inference answers `"stream": true` with an event stream (a server without streaming
    rejects the unknown field)."""
    response = await server.exchange(server.post_message("/inference", dict(prompt=" hello", num_tokens=1,
                                                                            stream=True)))
    await response.read()
    return response.status == 200 and response.content_type == "text/event-stream"


async def _send_plain(server: Server, message: bytes, request: Request) -> RequestRecord:
    sent = time.perf_counter()
    response = await server.exchange(message)
    payload = json.loads(await response.read())
    finish = time.perf_counter()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {payload}")
    return RequestRecord(arrival=sent, first_token=sent + payload["ttft"], finish=finish,
                         prompt_tokens=len(request.prompt_ids), output_tokens=payload["completion_tokens"],
                         requested_tokens=request.output_len)


async def _send_streaming(server: Server, message: bytes, request: Request) -> RequestRecord:
    """Token times are the arrival times of events with text; an event carries several tokens (the server sends a
    stream's text at most every STREAM_INTERVAL_MS, 20 ms by default, and more when its writer fell behind), so
    ITL is per event, as a client sees it, and TPOT counts tokens. A stream that ends for "length"
    produced exactly num_tokens."""
    sent = time.perf_counter()
    token_times, finish_reason, done = [], None, False
    response = await server.exchange(message)
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
    pending = b""
    async for chunk in response.chunks():  # server-sent events, one `data:` line each
        arrived = time.perf_counter()
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if done or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("text"):
                token_times.append(arrived)
            finish_reason = event.get("finish_reason") or finish_reason
    finish = time.perf_counter()
    if not token_times:
        raise RuntimeError("the stream ended without a token")
    output_tokens = request.output_len if finish_reason == "length" else len(token_times)
    return RequestRecord(arrival=sent, first_token=token_times[0], finish=finish,
                         prompt_tokens=len(request.prompt_ids), output_tokens=output_tokens,
                         requested_tokens=request.output_len, token_times=token_times)
