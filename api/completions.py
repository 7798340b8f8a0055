"""The OpenAI completions protocol over our engine: turns a `/v1/completions` body into sequences, and their
results into OpenAI's completion object or stream chunks. Knows no Flask; app.py routes to it.

GPT-2 has no chat template, so only the (legacy) completions API is served. Choices are ordered prompt-major:
choice `p * n + j` is the j-th sample of prompt p. With a seed, sample j uses seed + j, so samples differ and the
whole response is reproducible. A request holds len(prompts) * n sequences; more than the server's queue takes
(MAX_WAITING) are refused before any is built: they could never all wait at once. `echo` with `logprobs` is
refused: it needs prompt logprobs, which the engine does not compute.
"""
import itertools
import time
from dataclasses import dataclass, replace
from typing import Iterator

from api.errors import ApiError
from api.submission import Delta
from api.validation import InvalidRequest, cache_salt, checked, check_text, number, reject_unknown, \
    stop_strings, typed
from batching import Inference
from engine.params import SamplingParams
from engine.tokenizer import EOT_TOKEN, decode, encode

MAX_N = 128  # OpenAI's own limit
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "echo", "logprobs",
          "stream", "stream_options", "user", "cache_salt",
          "best_of", "suffix", "presence_penalty", "frequency_penalty", "logit_bias",  # accepted only when inert
          "top_k", "ignore_eos"}  # vLLM's extensions (the openai client sends them via extra_body)


@dataclass
class CompletionRequest:
    model: str
    prompts: list[tuple[str, list[int]]]  # (text, token ids)
    params: SamplingParams
    n: int
    echo: bool
    stream: bool
    include_usage: bool
    cache_salt: str | None

    def inferences(self, request_id: str) -> list[Inference]:
        samples = [(text, token_ids, j) for text, token_ids in self.prompts for j in range(self.n)]
        return [Inference(text, token_ids, self._params_of_sample(j),
                          request_id=request_id if len(samples) == 1 else f"{request_id}-{i}",
                          cache_salt=self.cache_salt)
                for i, (text, token_ids, j) in enumerate(samples)]

    def _params_of_sample(self, j: int) -> SamplingParams:
        return self.params if self.params.seed is None else replace(self.params, seed=self.params.seed + j)


def parse_completion_request(body: dict, model: str, max_sequences: int) -> CompletionRequest:
    reject_unknown(body, FIELDS)
    asked_model = typed(body, "model", (str,), default=model)
    if asked_model != model:
        raise ApiError(404, f"The model `{asked_model}` does not exist. This server serves `{model}`: pass "
                            f"\"model\": \"{model}\" or leave `model` out (GET /v1/models gives the id).", "model",
                       "model_not_found")
    n = typed(body, "n", (int,), default=1)
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_N}; got {n}", "n")
    _reject_unsupported(body, n)
    params = checked(SamplingParams(
        max_tokens=typed(body, "max_tokens", (int,), default=16),
        temperature=number(body, "temperature", default=1.0),
        top_p=number(body, "top_p", default=1.0),
        top_k=max(typed(body, "top_k", (int,), default=0), 0),  # vLLM spells "off" -1, we spell it 0
        seed=typed(body, "seed", (int,)),
        stop=stop_strings(body),
        ignore_eos=typed(body, "ignore_eos", (bool,), default=False),
        logprobs=typed(body, "logprobs", (int,)),
    ))
    echo = typed(body, "echo", (bool,), default=False)
    if echo and params.logprobs is not None:
        raise InvalidRequest("'echo' together with 'logprobs' is not supported: this server does not compute "
                             "prompt logprobs", "echo", "unsupported")
    stream = typed(body, "stream", (bool,), default=False)
    typed(body, "user", (str,))  # accepted for compatibility; nothing here tells users apart
    prompts = prompt_list(body.get("prompt"))
    if len(prompts) * n > max_sequences:
        raise InvalidRequest(f"the request asks for {len(prompts)} prompts x n={n} = {len(prompts) * n} sequences; "
                             f"this server queues at most {max_sequences} (MAX_WAITING)", "n" if n > 1 else "prompt",
                             "too_many_sequences")
    prompts = [tokenized(p) for p in prompts]  # each must fit the context: batching.admit
    return CompletionRequest(asked_model, prompts, params, n, echo, stream, _include_usage(body, stream),
                             cache_salt(body))


def _reject_unsupported(body: dict, n: int) -> None:
    if body.get("best_of") not in (None, n):
        raise InvalidRequest("'best_of' other than n is not supported", "best_of", "unsupported")
    if body.get("suffix") is not None:
        raise InvalidRequest("'suffix' is not supported: GPT-2 only continues text", "suffix", "unsupported")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if body.get(penalty) not in (None, 0):
            raise InvalidRequest(f"'{penalty}' is not supported", penalty, "unsupported")
    if body.get("logit_bias"):
        raise InvalidRequest("'logit_bias' is not supported", "logit_bias", "unsupported")


def _include_usage(body: dict, stream: bool) -> bool:
    options = typed(body, "stream_options", (dict,))
    if options is None:
        return False
    if not stream:
        raise InvalidRequest("'stream_options' is only allowed with 'stream': true", "stream_options")
    reject_unknown(options, {"include_usage"})
    return typed(options, "include_usage", (bool,), default=False)


def prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's four forms -- a string, a list of strings, a list of token ids, or a list of token-id lists, one
    form per request (never mixed) -> a list of prompts, each a string or a list of token ids (checked, not yet
    tokenized)."""
    def is_ids(x) -> bool:
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if prompt is None:
        raise InvalidRequest("'prompt' is required", "prompt", "missing_field")
    if isinstance(prompt, str) or is_ids(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or
                                                  all(is_ids(p) for p in prompt)):
        prompts = prompt
    else:
        raise InvalidRequest("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                             "token-id lists, not a mix of these", "prompt", "invalid_type")
    for p in prompts:
        if not p:
            raise InvalidRequest("'prompt' must not be empty", "prompt")
        if isinstance(p, str):
            check_text(p, "prompt")
        elif not all(0 <= t <= EOT_TOKEN for t in p):
            raise InvalidRequest(f"token ids must be in [0, {EOT_TOKEN}]", "prompt")
    return prompts


def tokenized(prompt: str | list[int]) -> tuple[str, list[int]]:
    """(text, token ids) of a prompt given as either."""
    return (prompt, encode(prompt)) if isinstance(prompt, str) else (decode(prompt), list(prompt))


class Completion:
    """OpenAI objects from a request's finished (or streaming) sequences."""

    def __init__(self, req: CompletionRequest, infs: list[Inference], request_id: str):
        self.req, self.infs = req, infs
        self.head = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()),
                     "model": req.model}
        self._echo_pending = [req.echo] * len(infs)
        self._logprobs_sent = [0] * len(infs)  # tokens whose logprobs went out already
        self._text_offset = [len(inf.prompt) if req.echo else 0 for inf in infs]

    def response(self) -> dict:
        choices = [self._choice(Delta(i, inf.text, inf.finish_reason, len(inf.output_ids)))
                   for i, inf in enumerate(self.infs)]
        return {**self.head, "choices": choices, "usage": self.usage()}

    def chunks(self, deltas: Iterator[list[Delta]]) -> Iterator[dict]:
        """One chunk per sequence delta, then (with include_usage) one with the usage and no choices."""
        usage = {"usage": None} if self.req.include_usage else {}
        for batch in deltas:
            for delta in batch:
                yield {**self.head, "choices": [self._choice(delta)], **usage}
        if self.req.include_usage:
            yield {**self.head, "choices": [], "usage": self.usage()}

    def usage(self) -> dict:
        prompt = sum(len(ids) for _, ids in self.req.prompts)
        completion = sum(len(inf.output_ids) for inf in self.infs)  # the text's tokens, as /inference counts
        cached = sum(inf.cached_tokens for inf in self.infs[::self.req.n])  # a prompt's n samples count it once
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _choice(self, delta: Delta) -> dict:
        i = delta.index
        text = delta.text
        if self._echo_pending[i]:
            text, self._echo_pending[i] = self.infs[i].prompt + text, False
        return {"text": text, "index": i, "logprobs": self._new_logprobs(i, delta.num_tokens),
                "finish_reason": delta.finish_reason}

    def _new_logprobs(self, i: int, upto: int) -> dict | None:
        """OpenAI's logprobs object for sequence i's tokens not reported yet, up to token `upto` (those whose text
        has been sent: a token held back with text that may become a stop string is held back too). The sampled
        token is always in top_logprobs, so a position holds up to logprobs + 1 entries (as in vLLM)."""
        if self.req.params.logprobs is None:
            return None
        new = self.infs[i].logprobs[self._logprobs_sent[i]:upto]
        self._logprobs_sent[i] += len(new)
        tokens = [decode([t.token]) for t in new]
        offsets = list(itertools.accumulate((len(s) for s in tokens), initial=self._text_offset[i]))
        self._text_offset[i] = offsets.pop()
        top = [{**{decode([alt]): lp for alt, lp in (t.top_logprobs or {}).items()}, s: t.logprob}
               for t, s in zip(new, tokens)]
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in new], "top_logprobs": top,
                "text_offset": offsets}


def models_response(model: str, created: int, max_context: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "effective-batching", "max_model_len": max_context}]}
