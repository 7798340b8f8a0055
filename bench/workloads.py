"""The seeded workloads of the benchmarks (bench/README.md): what each request asks for, and when it arrives.

A request (client/workload.py) is here its prompt's token ids, an exact output length (the benchmarks ask for
greedy tokens with EOS ignored) and an arrival offset. `seed_burst` and `offline` replay the HF peer driver's
draws exactly, so token totals are the same for every system (seed burst 8,410 output tokens, offline-256
72,412).
"""
import math
import random
from typing import NamedTuple

from client.workload import Request

GPT2_VOCAB = 50257


def seed_burst(n: int, vocab: int = GPT2_VOCAB, seed: int = 0) -> list[Request]:
    """The original client's requests all at t=0: 3-token prompts, outputs from 5..145 step 5."""
    rng = random.Random(seed)
    return [Request([rng.randrange(vocab) for _ in range(3)], rng.choice(range(5, 150, 5))) for _ in range(n)]


def offline(n: int, lo: int, hi: int, vocab: int = GPT2_VOCAB, seed: int = 0) -> list[Request]:
    """nano-vllm's benchmark shape: prompt and output lengths uniform in [lo, hi], all at t=0."""
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        prompt_len = rng.randint(lo, hi)
        requests.append(Request([rng.randrange(vocab) for _ in range(prompt_len)], rng.randint(lo, hi)))
    return requests


def shared_prefix(n: int, shared: int, unique: int, output: int, vocab: int = GPT2_VOCAB,
                  seed: int = 0) -> list[Request]:
    """A system prompt every request shares: the same `shared` tokens, then `unique` of the request's own, all at
    t=0 (what prefix caching is for: every prompt but the first can start after the shared part)."""
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(shared)]
    return [Request(system + [rng.randrange(vocab) for _ in range(unique)], output) for _ in range(n)]


class Conversation(NamedTuple):
    """A multi-turn chat, replayed closed loop: turn 1's prompt is the opening; each later turn's prompt is the turn
    before's prompt and answer (the tokens the engine generated, known only once it finished) and the user's next
    tokens."""
    opening: list[int]
    user_turns: list[list[int]]  # the user's tokens of turns 2, 3, ...
    num_tokens: int  # the answer's length at every turn

    @property
    def turns(self) -> int:
        return 1 + len(self.user_turns)

    @property
    def longest(self) -> int:
        """Tokens of the last turn, prompt and answer: the most the conversation holds in the KV cache at once."""
        return len(self.opening) + sum(map(len, self.user_turns)) + self.turns * self.num_tokens


def chat(n: int, turns: int, opening: int, user: int, output: int, context: int = 1024, vocab: int = GPT2_VOCAB,
         seed: int = 0) -> list[Conversation]:
    """n conversations of `turns` turns: a random opening of its own each, `user` new tokens per later turn and
    `output` tokens per answer; the last turn must fit the context."""
    rng = random.Random(seed)
    conversations = [Conversation([rng.randrange(vocab) for _ in range(opening)],
                                  [[rng.randrange(vocab) for _ in range(user)] for _ in range(turns - 1)], output)
                     for _ in range(n)]
    if conversations and conversations[0].longest > context:
        raise ValueError(f"the last turn needs {conversations[0].longest} tokens, past the {context}-token context")
    return conversations


def long_tailed(n: int, prompt_median: int, output_median: int, sigma: float, context: int,
                vocab: int = GPT2_VOCAB, seed: int = 0) -> list[Request]:
    """ShareGPT-like lengths (the data set is not reachable here): lognormal prompt and output lengths with a
    long right tail, at least 4 tokens each, clipped so that prompt + output fits the context."""
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        prompt_len = min(max(round(rng.lognormvariate(math.log(prompt_median), sigma)), 4), context - 4)
        output_len = min(max(round(rng.lognormvariate(math.log(output_median), sigma)), 4), context - prompt_len)
        requests.append(Request([rng.randrange(vocab) for _ in range(prompt_len)], output_len))
    return requests


def poisson_arrivals(requests: list[Request], qps: float, seed: int = 0) -> list[Request]:
    """The same requests arriving as a Poisson process of rate qps, the first at t=0. Unit-rate gaps are drawn
    once per seed and scaled by 1/qps, so every rate replays the same pattern, only faster."""
    rng = random.Random(seed)
    at, timed = 0.0, []
    for r in requests:
        timed.append(r._replace(arrival=at / qps))
        at += rng.expovariate(1.0)
    return timed
