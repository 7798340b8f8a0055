"""One error shape for every endpoint, plain or streamed: `{"error": {"message", "type", "param", "code"}}`.

Status codes are vLLM's: 400 bad request, 401 missing key, 404 unknown model or path, 405 wrong method, 408 body
not sent in time, 409 a demo burst still being sent, 413 body too large, 415 body not sent as JSON, 503 overloaded,
draining, or no engine serving (with Retry-After), 500 internal. `api_error` maps any exception to one.
"""
import logging

from flask import Response, jsonify
from werkzeug.exceptions import ClientDisconnected, HTTPException

from api.validation import InvalidRequest
from batching import Overloaded, TooLong
from serving.client import EngineStalled
from serving.router import NoEngine

log = logging.getLogger("effective-batching")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 415: "invalid_request_error", 499: "client_closed_request",
               500: "internal_server_error", 503: "server_overloaded"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> Response:
        resp = jsonify(self.body)
        resp.status_code = self.status
        resp.headers.update(self.headers)
        return resp


class ClientGone(Exception):
    """The client closed its connection while we waited on its request (nginx's 499)."""


def api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequest):
        return ApiError(400, str(e), e.param, e.code)
    if isinstance(e, TooLong):
        return ApiError(400, str(e), e.param, "context_length_exceeded")
    if isinstance(e, Overloaded):
        return ApiError(503, str(e), code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, (NoEngine, EngineStalled)):  # an engine restarting, or stalled: a moment later, or elsewhere
        return ApiError(503, str(e), code="engine_unhealthy", headers={"Retry-After": "5"})
    if isinstance(e, ClientDisconnected):  # the body stopped arriving: CLIENT_TIMEOUT_S, or the client left
        return ApiError(408, "the request body stopped arriving before it was complete", code="request_timeout")
    if isinstance(e, HTTPException):
        return ApiError(e.code or 500, e.description or e.name)
    if isinstance(e, ClientGone):
        return ApiError(499, "the client closed the connection", code="client_closed_request")
    log.error("unhandled error", exc_info=e)
    return ApiError(500, f"internal error: {e!r}", code="internal_error")
