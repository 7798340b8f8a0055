"""Async HTTP load (aiohttp): every request is sent at its arrival offset, whatever the server's state (open
loop), and timed on the client's clock.

When the server streams (`"stream": true` answered with `text/event-stream`: `data: {"text", "finish_reason"}`
events, then `data: [DONE]`), each event that carries text is a token's arrival, so TTFT and ITL are measured
as the client sees them. Otherwise each request gets one JSON response: TTFT is its `ttft` field (the server's
arrival -> first token), E2E is the client's, and there is no ITL.
"""
import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
from tqdm import tqdm

from bench.workloads import Request, as_text
from telemetry.latency import RequestRecord, summarize

NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30)


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
    bodies = [dict(prompt=as_text(r.prompt_ids), num_tokens=r.output_len, temperature=0, ignore_eos=True)
              for r in requests]  # built before the clock starts
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap on requests in flight
    async with aiohttp.ClientSession(url, connector=connector, timeout=NO_TIMEOUT) as session:
        streaming = await supports_streaming(session)
        send = _send_streaming if streaming else _send_plain
        await open_connections(session, sum(r.arrival < 1.0 for r in requests))
        records, errors = [], []
        start = time.perf_counter()
        with tqdm(total=len(requests), desc=desc, unit="req", leave=False) as bar:

            async def one(request: Request, body: dict) -> None:
                await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
                try:
                    records.append(await send(session, body, len(request.prompt_ids)))
                except Exception as e:
                    errors.append(repr(e)[:300])
                bar.update()

            await asyncio.gather(*(one(r, b) for r, b in zip(requests, bodies)))
    return Load(records, errors, streaming)


async def open_connections(session: aiohttp.ClientSession, n: int) -> None:
    """Open n kept-alive connections before the clock starts, for the requests sent at once: a client that keeps
    its connections (a proxy, an SDK's pool) pays no connect per request, and a hundred connects in one Python
    process take tens of milliseconds, which would be timed as the server's. (gunicorn keeps an idle connection
    for 2 s, so only the first second's requests get one.)"""
    async def one() -> None:
        async with session.get("/health") as resp:
            await resp.read()

    await asyncio.gather(*(one() for _ in range(n)))


async def supports_streaming(session: aiohttp.ClientSession) -> bool:
    """True when /inference answers `"stream": true` with an event stream (a server without streaming
    rejects the unknown field)."""
    async with session.post("/inference", json=dict(prompt=" hello", num_tokens=1, stream=True)) as resp:
        await resp.read()
        return resp.status == 200 and resp.content_type == "text/event-stream"


async def _send_plain(session: aiohttp.ClientSession, body: dict, prompt_tokens: int) -> RequestRecord:
    sent = time.perf_counter()
    async with session.post("/inference", json=body) as resp:
        payload = await resp.json(content_type=None)
    finish = time.perf_counter()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {payload}")
    return RequestRecord(arrival=sent, first_token=sent + payload["ttft"], finish=finish,
                         prompt_tokens=prompt_tokens, output_tokens=payload["completion_tokens"],
                         requested_tokens=body["num_tokens"])


async def _send_streaming(session: aiohttp.ClientSession, body: dict, prompt_tokens: int) -> RequestRecord:
    """Token times are the arrival times of events with text; an event carries several tokens (the server sends a
    stream's text at most every STREAM_INTERVAL_MS, 20 ms by default, and more when its writer fell behind), so
    ITL is per event, as a client sees it, and TPOT counts tokens. A stream that ends for "length"
    produced exactly num_tokens."""
    sent = time.perf_counter()
    token_times, finish_reason = [], None
    async with session.post("/inference", json={**body, "stream": True}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:  # server-sent events, one `data:` line each
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("text"):
                token_times.append(time.perf_counter())
            finish_reason = chunk.get("finish_reason") or finish_reason
    finish = time.perf_counter()
    if not token_times:
        raise RuntimeError("the stream ended without a token")
    output_tokens = body["num_tokens"] if finish_reason == "length" else len(token_times)
    return RequestRecord(arrival=sent, first_token=token_times[0], finish=finish, prompt_tokens=prompt_tokens,
                         output_tokens=output_tokens, requested_tokens=body["num_tokens"], token_times=token_times)
