"""Checks every endpoint's request parsing shares; each raises InvalidRequest (HTTP 400) naming the field.

Every numeric field is bounded here, before anything is built from it: a value that passes can become a tensor
or an index without failing the engine step it joins (one bad request must never fail the others).
"""
import math

from engine.params import SamplingParams
from engine.tokenizer import VOCAB_SIZE

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5
MAX_TOP_K = VOCAB_SIZE  # top_k beyond the vocabulary keeps every token, like 0
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # a 64-bit integer, as vLLM checks


class InvalidRequest(ValueError):
    """A request the server refuses (HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


def checked(params: SamplingParams) -> SamplingParams:
    """The sampling parameters, if every one is in range."""
    checks = [
        ("max_tokens", params.max_tokens >= 1, "must be at least 1"),
        ("temperature", 0 <= params.temperature <= 2, "must be between 0 and 2"),
        ("top_k", 0 <= params.top_k <= MAX_TOP_K, f"must be 0 (off) or at most the vocabulary, {MAX_TOP_K}"),
        ("top_p", 0 < params.top_p <= 1, "must be in (0, 1]"),
        ("seed", params.seed is None or SEED_RANGE[0] <= params.seed <= SEED_RANGE[1], "must be a 64-bit integer"),
        ("stop", len(params.stop) <= MAX_STOP_STRINGS and all(params.stop),
         f"takes at most {MAX_STOP_STRINGS} non-empty strings"),
        ("logprobs", params.logprobs is None or 0 <= params.logprobs <= MAX_LOGPROBS,
         f"must be between 0 and {MAX_LOGPROBS}"),
    ]
    for param, ok, why in checks:
        if not ok:
            raise InvalidRequest(f"'{param}' {why}; got {_short(getattr(params, param))}", param)
    return params


def typed(body: dict, name: str, types: tuple, required: bool = False, default=None):
    """body[name] if it has one of `types` (bool never counts as a number); JSON null counts as absent."""
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"'{name}' is required", name, "missing_field")
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise InvalidRequest(f"'{name}' must be {names}; got {_short(value)}", name, "invalid_type")
    if isinstance(value, str):
        check_text(value, name)
    return value


def number(body: dict, name: str, default: float) -> float:
    """body[name] as a finite float; JSON allows integers of any length and 1e400 (infinity)."""
    value = typed(body, name, (int, float), default=default)
    try:
        value = float(value)
    except OverflowError:
        raise InvalidRequest(f"'{name}' is out of range; got {_short(value)}", name) from None
    if not math.isfinite(value):
        raise InvalidRequest(f"'{name}' must be a finite number; got {value}", name)
    return value


def check_text(text: str, name: str) -> None:
    """JSON's \\ud800 escapes can spell lone surrogates, which no UTF-8 answer (or stream) can carry back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"'{name}' holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                             "text", name) from None


def reject_unknown(body: dict, accepted: set[str]) -> None:
    unknown = sorted(set(body) - accepted)
    if unknown:
        raise InvalidRequest(f"unknown field {_short(unknown[0])}; accepted: {', '.join(sorted(accepted))}",
                             unknown[0], "unknown_field")


MAX_CACHE_SALT = 256  # characters


def cache_salt(body: dict) -> str | None:
    """vLLM's per-request `cache_salt`: requests share cached KV blocks only when their salts are equal."""
    salt = typed(body, "cache_salt", (str,))
    if salt is not None and not 0 < len(salt) <= MAX_CACHE_SALT:
        raise InvalidRequest(f"'cache_salt' must be a non-empty string of at most {MAX_CACHE_SALT} characters",
                             "cache_salt")
    return salt


def stop_strings(body: dict) -> list[str]:
    stop = typed(body, "stop", (str, list), default=[])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("'stop' must be a string or a list of strings", "stop", "invalid_type")
    for s in stop:
        check_text(s, "stop")
    return stop


def _short(value, limit: int = 60) -> str:
    """A value for an error message, as Python writes it (a string comes quoted: write {_short(s)}, never
    '{_short(s)}'); a 400-digit number or a long string is cut, not echoed whole."""
    if isinstance(value, int) and abs(value) >= 10 ** 20:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
