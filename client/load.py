"""The load generator: a workload sent to a server's /inference, every request at its arrival offset whatever the
server's state (open loop), each timed on this process's clock. The client, the comparison and the HTTP
benchmarks all send with it.

A plain answer (the original API) is one JSON response: TTFT and the last token's time are the server's (its
`ttft` and `latency`), E2E is the client's, and there is no ITL. With `stream=True`, where the server streams
(`"stream": true` answered with `text/event-stream`: `data: {"text", "finish_reason"}` events, then
`data: [DONE]`), each event that carries text is a token's arrival, so TTFT and ITL are measured as the client
sees them.

HTTP/1.1 on asyncio's streams, written here rather than taken from a client library: a burst of a hundred
requests is a third of a second of GPU work, and a general-purpose async client spends 10-20 ms of Python
building and sending them (measured on the development CPU: the first request reached the server 11-18 ms after
the client began), time that would be timed as the server's. Here a request's bytes are made before the clock
starts, so sending one is a socket write (about 25 us), and a stream is read chunk by chunk as it arrives.
"""
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from tqdm import tqdm

from client import interrupts
from client.workload import Request
from telemetry.latency import RequestRecord, summarize

# Connect fast, but let a request wait as long as a slow policy keeps it queued.
CONNECT_TIMEOUT_S = 10


@dataclass
class Load:
    records: list[RequestRecord]  # one per request, in the workload's order; a failed one holds its error
    streaming: bool

    @property
    def answered(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.records if not r.ok]

    def outcome(self, **slo) -> dict:
        """A result row's fields: the latency.summarize figures of the answered requests (slo: slo_ttft,
        slo_tpot), or an error when none was answered."""
        fields = dict(streaming=self.streaming, failed=len(self.errors), errors=self.errors[:3])
        if not self.answered:
            return fields | dict(error=f"no request succeeded: {self.errors[:1]}")
        if self.streaming:  # 1.0: a token per event; more: the server merged tokens it could not send in time
            events = sum(len(r.token_times) for r in self.answered)
            fields["tokens_per_event"] = round(sum(r.output_tokens for r in self.answered) / events, 3)
        return fields | dict(metrics=summarize(self.answered, **slo))


def run_load(url: str, requests: list[Request], key: str | None = None, stream: bool = False, exact: bool = False,
             on_finish: Callable[[int, RequestRecord], None] | None = None, desc: str | None = None,
             progress: bool = True) -> Load:
    """Send the requests to `url`/inference at their arrival offsets; a record per request, failed or not.

    key: the server's API key. stream: ask for an event stream where the server gives one (asked first).
    exact: greedy with EOS ignored, so that each request produces exactly its tokens, the same ones every run.
    on_finish(index, record) is called as each answer arrives, e.g. to print it; a caller that prints asks for
    no progress bar, which would interleave with its lines. Within client.interrupts.stopping_cleanly_on_signals,
    a SIGTERM or SIGHUP cancels the load (its connections closed) and raises Interrupted.
    """
    return interrupts.run(_run_load(url, requests, key, stream, exact, on_finish, desc, progress))


def _quiet_interrupts(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """A KeyboardInterrupt raised in one request's task (by on_finish, or by a Ctrl-C that asyncio does not turn
    into a cancellation) ends the run, and the caller reports it; that task's exception, never retrieved, is not
    another error to print as a traceback."""
    if not isinstance(context.get("exception"), KeyboardInterrupt):
        loop.default_exception_handler(context)


async def _run_load(url: str, requests: list[Request], key: str | None, stream: bool, exact: bool,
                    on_finish: Callable[[int, RequestRecord], None] | None, desc: str | None,
                    progress: bool) -> Load:
    asyncio.get_running_loop().set_exception_handler(_quiet_interrupts)
    server = Server(url, key)
    try:
        streaming = stream and await supports_streaming(server)
        sampling = dict(temperature=0, ignore_eos=True) if exact else {}
        texts = [r.text for r in requests]
        messages = [server.post_message("/inference", dict(prompt=text, num_tokens=r.num_tokens, **sampling,
                                                           seed=r.seed, stream=streaming or None))
                    for r, text in zip(requests, texts)]
        await server.open_connections(sum(r.arrival < 1.0 for r in requests))
        records: list[RequestRecord | None] = [None] * len(requests)
        start = time.perf_counter()
        with tqdm(total=len(requests), desc=desc, unit="req", leave=False, dynamic_ncols=True,
                  disable=not progress) as bar:

            async def one(i: int, request: Request, message: bytes) -> None:
                await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
                records[i] = await send(server, message, request, texts[i], streaming)
                bar.update()
                if on_finish:
                    on_finish(i, records[i])

            await asyncio.gather(*(one(i, r, m) for i, (r, m) in enumerate(zip(requests, messages))))
    finally:
        server.close()
    return Load(records, streaming)


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def error_text(status: int, body: bytes) -> str:
    """The server's `{"error": {"message": ...}}` text, or the raw body when it is not that shape."""
    try:
        return f"HTTP {status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body.decode('utf-8', 'replace')[:200]}"


class Failed(Exception):
    """The server answered with an error; the message is the record's error."""


class Server:
    """One HTTP/1.1 server and a pool of kept-alive connections to it."""

    def __init__(self, url: str, key: str | None = None):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.headers = "".join(f"{name}: {value}\r\n" for name, value in auth_headers(key).items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def post_message(self, path: str, body: dict) -> bytes:
        """The bytes of a POST of `body` as JSON (fields that are None left out)."""
        data = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"{self.headers}Content-Length: {len(data)}\r\n\r\n").encode() + data

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT_S)

    async def open_connections(self, n: int) -> None:
        """Open n connections before the clock starts, for the requests sent at once: a client that keeps its
        connections (a proxy, an SDK's pool) pays no connect per request. Only the first second's requests get
        one; one that cannot be opened is left to its request, which records the failure."""
        opened = await asyncio.gather(*(self.connect() for _ in range(n - len(self._idle))), return_exceptions=True)
        self._idle += [c for c in opened if not isinstance(c, BaseException)]

    async def exchange(self, message: bytes) -> "Response":
        """Send one request, on an idle connection if one is still open, and read the response's head."""
        while self._idle:
            if response := await self._exchange_on(*self._idle.pop(), message):
                return response
        if response := await self._exchange_on(*await self.connect(), message):
            return response
        raise ConnectionError("the server closed the connection without answering")

    async def _exchange_on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           message: bytes) -> "Response | None":
        """None when the connection turns out closed (the server lets idle ones go) before an answer began. One left
        mid-exchange (the request cancelled, a head we cannot read) is closed, for the server to see."""
        try:
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
        except BaseException:
            writer.close()
            raise
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


async def send(server: Server, message: bytes, request: Request, text: str, streaming: bool) -> RequestRecord:
    """One request's record. Never raises: a failure is recorded, and the other requests go on."""
    sent = time.perf_counter()
    try:
        response = await server.exchange(message)
        if response.status != 200:
            raise Failed(error_text(response.status, await response.read()))
        return await (_read_stream if streaming else _read_plain)(response, request, text, sent)
    except Exception as e:  # whatever went wrong is this request's outcome, not the whole load's
        return RequestRecord(arrival=sent, finish=time.perf_counter(), requested_tokens=request.num_tokens,
                             prompt=text, error=str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}")


async def _read_plain(response: Response, request: Request, text: str, sent: float) -> RequestRecord:
    payload = json.loads(await response.read())
    finish = time.perf_counter()
    latency = payload.get("latency")
    known = request.prompt_tokens  # a token-id prompt's own count; the server's for text
    return RequestRecord(arrival=sent, finish=finish, first_token=sent + payload["ttft"],
                         prompt_tokens=payload.get("prompt_tokens") if known is None else known,
                         output_tokens=payload["completion_tokens"], requested_tokens=request.num_tokens,
                         last_token=None if latency is None else sent + latency, prompt=text,
                         completion=payload.get("completion"))


async def _read_stream(response: Response, request: Request, text: str, sent: float) -> RequestRecord:
    """Token times are the arrival times of events with text. An event is a token by default, but may carry
    several (the server merges what piled up for a stream when its writer fell behind, and with STREAM_INTERVAL_MS
    it sends at most that often), so ITL is per event, as a client sees it, and TPOT counts tokens. A stream that
    ends for "length" produced exactly num_tokens."""
    token_times, pieces, finish_reason, done = [], [], None, False
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
                raise Failed(f"stream error: {event['error']}")
            if event.get("text"):
                token_times.append(arrived)
                pieces.append(event["text"])
            finish_reason = event.get("finish_reason") or finish_reason
    finish = time.perf_counter()
    if not token_times:
        raise Failed("the stream ended without a token")
    output_tokens = request.num_tokens if finish_reason == "length" else len(token_times)
    return RequestRecord(arrival=sent, finish=finish, first_token=token_times[0],
                         prompt_tokens=request.prompt_tokens, output_tokens=output_tokens,
                         requested_tokens=request.num_tokens, token_times=token_times, prompt=text,
                         completion=text + "".join(pieces))
