"""Sampling parameters of a request and the sampler that draws one token for every sequence of a step at once.

Defaults are the original project's: plain multinomial sampling from the full softmax at temperature 1, no
top-k/top-p, never stopping early. Temperature 0 is greedy.
"""
from dataclasses import dataclass, field

import torch


class InvalidRequest(ValueError):
    """A request the server refuses (HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = True  # the original never stopped at <|endoftext|>
    logprobs: int | None = None  # how many top alternatives to return with each token's logprob

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0 <= self.temperature <= 2, "must be between 0 and 2"),
            ("top_k", self.top_k >= 0, "must be 0 (off) or positive"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS and all(self.stop),
             f"takes at most {MAX_STOP_STRINGS} non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be between 0 and {MAX_LOGPROBS}"),
        ]
        for param, ok, why in checks:
            if not ok:
                raise InvalidRequest(f"'{param}' {why}; got {getattr(self, param)!r}", param)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SampledToken:
    token: int
    logprob: float | None = None  # log-probability under the model's distribution (before temperature)
    top_logprobs: dict[int, float] | None = None


class Sampler:
    """One call per step for the whole batch, one host sync. A request with a seed draws from its own generator,
    so its tokens do not depend on what else is in the batch."""

    def __init__(self, device: torch.device, seed: int | None = None):
        self.device = device
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[SampledToken]:
        """logits: (B, vocab) fp32."""
        tokens = logits.argmax(dim=-1)
        if not all(p.greedy for p in params):
            greedy = torch.tensor([p.greedy for p in params], device=logits.device)
            tokens = torch.where(greedy, tokens, self._draw(logits, params, generators))
        result = [SampledToken(t) for t in tokens.tolist()]
        wants_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wants_logprobs:
            logp = torch.log_softmax(logits[wants_logprobs], dim=-1)
            for j, i in enumerate(wants_logprobs):
                result[i].logprob = logp[j, result[i].token].item()
                if params[i].logprobs:
                    top = logp[j].topk(params[i].logprobs)
                    result[i].top_logprobs = dict(zip(top.indices.tolist(), top.values.tolist()))
        return result

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams],
              generators: list[torch.Generator | None]) -> torch.Tensor:
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
        scaled = logits / temperature[:, None]
        if any(p.top_k for p in params):
            scaled = _apply_top_k(scaled, [p.top_k for p in params])
        if any(p.top_p < 1 for p in params):
            scaled = _apply_top_p(scaled, torch.tensor([p.top_p for p in params], device=logits.device))
        # inverse-CDF sampling: one uniform number per row, so a seeded row costs one draw from its generator
        cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
        u = torch.rand(len(params), 1, device=cdf.device, generator=self.generator)
        for row, gen in enumerate(generators):
            if gen is not None:
                u[row] = torch.rand(1, device=cdf.device, generator=gen)
        # side="right": the first token whose cumulative probability exceeds u, never a zero-probability one
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp(max=cdf.shape[-1] - 1)


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    k = torch.tensor([t if t > 0 else logits.shape[-1] for t in top_k], device=logits.device)
    k = k.clamp(max=logits.shape[-1])
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens ranked above it already cover top_p; the first token always stays
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
