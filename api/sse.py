"""Server-sent events as OpenAI streams them, for /v1/completions and /inference alike: one `data: {json}\\n\\n`
per chunk, `data: [DONE]\\n\\n` at the end; an error mid-stream is sent as `data: {"error": {...}}` before [DONE].

Each chunk is written as soon as it is yielded: a generator response has no Content-Length, so gunicorn sends it
with chunked transfer encoding, one write per chunk, and nothing on our side buffers it.
"""
import json
from typing import Callable, Iterator

from flask import Response

from api.errors import api_error


def event(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()  # whole events only: a character never spans two writes


def sse_response(chunks: Iterator[dict], release: Callable[[], None]) -> Response:
    """Stream `chunks`; `release` runs however the stream ends, also when a write to a vanished client fails
    (gunicorn then closes this generator: GeneratorExit at the yield)."""
    def frames() -> Iterator[bytes]:
        try:
            for chunk in chunks:
                yield event(chunk)
        except Exception as e:
            yield event(api_error(e).body)
        finally:
            release()
        yield event("[DONE]")

    return Response(frames(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
