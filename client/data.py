"""The client's workload: which requests are sent, how many tokens each asks for, and when each is launched.

Everything is drawn from one seeded generator, so every policy in a comparison receives the same requests in the
same order at the same offsets. As in the original client, prompts are "Request {i}", num_tokens is drawn from a
list of choices, and launches are separated by U(0, 1) x wait seconds.
"""
import random
from typing import NamedTuple

SELECTIONS = ("random", "descend")
DEFAULT_NUM_TOKENS_RANGE = (1, 25, 100)


class Sample(NamedTuple):
    prompt: str
    num_tokens: int
    launch_at: float  # seconds after the first launch


class PromptData:
    def __init__(
        self,
        num_samples: int,
        num_tokens_range: tuple[int, ...] | list[int] = DEFAULT_NUM_TOKENS_RANGE,
        selection: str = "random",
        wait: float = 1.0,
        seed: int = 0,
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if num_samples < 0 or wait < 0:
            raise ValueError("num_samples and wait must not be negative")
        if not num_tokens_range or min(num_tokens_range) < 1:
            raise ValueError("num_tokens_range needs at least one choice, each >= 1")
        rng = random.Random(seed)
        # Token counts are drawn before the gaps, so changing --wait does not change which requests are sent.
        requests = [(f"Request {i}", rng.choice(num_tokens_range)) for i in range(num_samples)]
        if selection == "descend":
            requests.sort(key=lambda request: request[1], reverse=True)
        launch_at = launch_offsets(num_samples, wait, rng)
        self.samples = [Sample(prompt, num_tokens, at) for (prompt, num_tokens), at in zip(requests, launch_at)]


def launch_offsets(num_samples: int, wait: float, rng: random.Random) -> list[float]:
    """Offsets of each launch from the first: a gap of U(0, 1) x wait seconds after every launch."""
    offsets, at = [], 0.0
    for _ in range(num_samples):
        offsets.append(at)
        at += rng.random() * wait
    return offsets
