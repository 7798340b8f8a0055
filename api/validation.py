"""Checks every endpoint's request parsing shares; each raises InvalidRequest (HTTP 400) naming the field."""
from engine.sampler import SamplingParams

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5


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
        ("top_k", params.top_k >= 0, "must be 0 (off) or positive"),
        ("top_p", 0 < params.top_p <= 1, "must be in (0, 1]"),
        ("stop", len(params.stop) <= MAX_STOP_STRINGS and all(params.stop),
         f"takes at most {MAX_STOP_STRINGS} non-empty strings"),
        ("logprobs", params.logprobs is None or 0 <= params.logprobs <= MAX_LOGPROBS,
         f"must be between 0 and {MAX_LOGPROBS}"),
    ]
    for param, ok, why in checks:
        if not ok:
            raise InvalidRequest(f"'{param}' {why}; got {getattr(params, param)!r}", param)
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
        raise InvalidRequest(f"'{name}' must be {names}; got {value!r}", name, "invalid_type")
    return value


def reject_unknown(body: dict, accepted: set[str]) -> None:
    unknown = sorted(set(body) - accepted)
    if unknown:
        raise InvalidRequest(f"unknown field '{unknown[0]}'; accepted: {', '.join(sorted(accepted))}",
                             unknown[0], "unknown_field")


def stop_strings(body: dict) -> list[str]:
    stop = typed(body, "stop", (str, list), default=[])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("'stop' must be a string or a list of strings", "stop", "invalid_type")
    return stop


def seed_value(body: dict) -> int | None:
    value = typed(body, "seed", (int,))
    if value is not None and not -(1 << 63) <= value < 1 << 63:  # what a torch.Generator takes, as vLLM checks
        raise InvalidRequest(f"'seed' must be a 64-bit integer; got {value}", "seed")
    return value


def check_context_length(num_prompt_tokens: int, max_tokens: int, max_context: int, max_tokens_param: str) -> None:
    """vLLM's wording, so clients that parse it (to shrink the request and retry) keep working."""
    if num_prompt_tokens >= max_context:
        raise InvalidRequest(
            f"This model's maximum context length is {max_context} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens. Please reduce the length of the input.",
            "prompt", "context_length_exceeded")
    if num_prompt_tokens + max_tokens > max_context:
        raise InvalidRequest(
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} in the "
            "completion). Please reduce the length of the prompt or completion.",
            max_tokens_param, "context_length_exceeded")
