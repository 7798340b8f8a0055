"""The sampler: it draws one token for every sequence of a step at once, on the step's device, with one
device-to-host copy of the sampled ids (the parameters and the token are engine/params.py's).

Defaults are the original project's: plain multinomial sampling from the full softmax at temperature 1, no
top-k/top-p, never stopping early. A temperature under GREEDY_BELOW is greedy.

Randomness is counter-based: the uniform number behind a sequence's n-th token is a hash of (its seed, n),
computed on the host in numpy. So a sequence's draws depend on nothing else in the batch, survive preemption
(recompute draws the same numbers), and are the same on every device. A request without a seed gets one from
the sampler's own generator (the server's SEED).
"""
import random

import numpy as np
import torch

from engine.params import GREEDY_BELOW, SampledToken, SamplingParams


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps around, as the hash wants
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seeds: list[int], counters: list[int]) -> np.ndarray:
    """One number in [0, 1) per (seed, counter), float64 with 53 random bits."""
    s = np.array([seed & 0xFFFF_FFFF_FFFF_FFFF for seed in seeds], dtype=np.uint64)
    x = _splitmix64(_splitmix64(s) ^ np.array(counters, dtype=np.uint64))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


class Sampler:

    def __init__(self, device: torch.device, vocab_size: int, seed: int | None = None):
        self.device = device
        self.vocab_size = vocab_size  # the tokenizer's: a checkpoint's padded vocabulary is never sampled
        self.seeds = random.Random(seed)

    def new_seed(self) -> int:
        return self.seeds.getrandbits(63)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], counters: list[int],
                 argmax: torch.Tensor | None = None) -> list[SampledToken]:
        """`draw`, then `collect`: the tokens, once the device has them."""
        return self.draw(logits, params, seeds, counters, argmax).collect()

    def draw(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], counters: list[int],
             argmax: torch.Tensor | None = None) -> "Drawn":
        """logits: (B, model vocab) fp32; row b draws with uniforms(seeds[b], counters[b]). argmax: the greedy
        ids if the caller has them already (a decode graph computes them). The draw is queued on the device;
        `collect()` waits for it."""
        logits = logits[:, :self.vocab_size]
        tokens = logits.argmax(dim=-1) if argmax is None else argmax
        if not all(p.greedy for p in params):
            u = torch.from_numpy(uniforms(seeds, counters)).to(self.device, non_blocking=True)
            greedy = torch.tensor([p.greedy for p in params]).to(self.device, non_blocking=True)
            tokens = torch.where(greedy, tokens, self._draw(logits, params, u))
        return Drawn(logits, tokens, params)

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF sampling from the filtered softmax: the first token whose cumulative probability exceeds
        u * total. In float64, so u < 1 always lands on a token, and never on a zero-probability one."""
        temperature = torch.tensor([max(p.temperature, GREEDY_BELOW) for p in params])
        scaled = logits / temperature.to(self.device, non_blocking=True)[:, None]
        if any(p.top_k for p in params):
            scaled = _apply_top_k(scaled, [p.top_k for p in params])
        if any(p.top_p < 1 for p in params):
            top_p = torch.tensor([p.top_p for p in params]).to(self.device, non_blocking=True)
            scaled = _apply_top_p(scaled, top_p)
        cdf = row_cumsum(torch.softmax(scaled, dim=-1).double())
        return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)


class Drawn:
    """A step's draw, queued on the device with its copy to the host: the tokens, and the log-probabilities where
    asked for (computed now, before a later step overwrites the logits)."""

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]):
        self.logits, self.tokens, self.params = logits, tokens, params  # a graph's: valid until it replays again
        self.logprob_rows = [b for b, p in enumerate(params) if p.logprobs is not None]
        on_device = [tokens]
        if self.logprob_rows:
            on_device += self._logprobs(logits, tokens)
        self._host = [t.to("cpu", non_blocking=True) for t in on_device]  # pinned: the copies do not block
        self._copied = None
        if tokens.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    @torch.inference_mode()
    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The chosen tokens' logprobs and the top alternatives of the rows that asked for them."""
        rows = self.logprob_rows
        k = max(self.params[b].logprobs for b in rows)
        logp = torch.log_softmax(logits[rows], dim=-1)
        top = logp.topk(max(k, 1))
        return [logp.gather(1, tokens[rows][:, None]).squeeze(1), top.indices, top.values]

    def collect(self) -> list[SampledToken]:
        """The sampled tokens (and logprobs where asked for): the step's one wait for the device."""
        if self._copied is not None:
            self._copied.synchronize()
        result = [SampledToken(t) for t in self._host[0].tolist()]
        if self.logprob_rows:
            chosen, top_ids, top_values = (t.tolist() for t in self._host[1:])
            for j, b in enumerate(self.logprob_rows):
                result[b].logprob = chosen[j]
                n = self.params[b].logprobs
                if n:
                    result[b].top_logprobs = dict(zip(top_ids[j][:n], top_values[j][:n]))
        return result


def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    """x.cumsum(dim=-1) of (B, V), each row's sums in the same order whatever B: CUDA scans a lone row with another
    kernel (cub's) than several rows, so a lone row is scanned beside a copy of itself (BATCH_INVARIANT needs a
    request's draws to be the same alone and in a batch)."""
    if x.shape[0] == 1 and x.is_cuda:
        return x.expand(2, -1).cumsum(dim=-1)[:1]
    return x.cumsum(dim=-1)


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    k = torch.tensor([min(t, vocab) if t > 0 else vocab for t in top_k]).to(logits.device, non_blocking=True)
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # (B, 1): values, ties or not
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # stable: tied tokens (bf16 logits tie often) ranked by id, whichever sort the row count picks
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens ranked above it already cover top_p; the first token always stays
    drop_sorted = (row_cumsum(probs) - probs) >= top_p[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
