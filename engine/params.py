"""A request's sampling parameters and a sampled token: plain data that the HTTP processes share with the engine
(they import no torch; the sampler is engine/sampler.py)."""
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # temperatures this small overflow the softmax; they mean "the most likely token"


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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class SampledToken:
    token: int
    logprob: float | None = None  # log-probability under the model's distribution (before temperature)
    top_logprobs: dict[int, float] | None = None
