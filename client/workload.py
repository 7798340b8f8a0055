"""A workload: the requests a load sends, each a prompt, the tokens it asks for and when it is sent.

The client's is the original's (`PromptData`): everything is drawn from one seeded generator, so every policy in a
comparison receives the same requests in the same order at the same offsets. As in the original client, prompts
are "Request {i}", num_tokens is drawn from a list of choices, and launches are separated by U(0, 1) x wait
seconds. The benchmarks' workloads (bench/workloads.py) are token ids, sent over HTTP as a text of exactly as many
tokens (`as_text`).
"""
import functools
import random
import re
from typing import NamedTuple

SELECTIONS = ("random", "descend")
DEFAULT_NUM_TOKENS_RANGE = (1, 25, 100)


class Request(NamedTuple):
    prompt: str | list[int]  # text, or token ids
    num_tokens: int  # output tokens asked for
    arrival: float = 0.0  # seconds after the first request
    seed: int | None = None  # the request's sampling seed, if it sends one

    @property
    def text(self) -> str:
        """The prompt as /inference takes it: token ids become a text that encodes to exactly as many tokens."""
        return self.prompt if isinstance(self.prompt, str) else as_text(self.prompt)

    @property
    def prompt_tokens(self) -> int | None:
        """Known for token ids; a text's count is the server's to say."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


class PromptData:
    def __init__(
        self,
        num_samples: int,
        num_tokens_range: tuple[int, ...] | list[int] = DEFAULT_NUM_TOKENS_RANGE,
        selection: str = "random",
        wait: float = 1.0,
        seed: int = 0,
        seeded: bool = False,
    ) -> None:
        """seeded: each request also carries a sampling seed of its own (drawn last, so the rest is the same with
        or without), so that its text can be compared across servers."""
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
        arrivals = launch_offsets(num_samples, wait, rng)
        seeds = [rng.randrange(1 << 31) if seeded else None for _ in requests]
        self.requests = [Request(prompt, num_tokens, at, s) for (prompt, num_tokens), at, s in
                         zip(requests, arrivals, seeds)]


def launch_offsets(num_samples: int, wait: float, rng: random.Random) -> list[float]:
    """Offsets of each launch from the first: a gap of U(0, 1) x wait seconds after every launch."""
    offsets, at = [], 0.0
    for _ in range(num_samples):
        offsets.append(at)
        at += rng.random() * wait
    return offsets


@functools.cache
def _single_token_words() -> list[str]:
    """Vocabulary entries that are a space and lowercase letters: GPT-2's pre-tokenizer cuts text at each space,
    and a piece that is itself a vocabulary entry encodes to that one token, so a run of them re-encodes to
    exactly as many tokens."""
    from engine.tokenizer import EOT_TOKEN, get_tokenizer  # only for token-id prompts: the client sends text
    enc = get_tokenizer()
    words = (enc.decode_single_token_bytes(i) for i in range(EOT_TOKEN))
    return [w.decode() for w in words if re.fullmatch(rb" [a-z]+", w)]


def as_text(prompt_ids: list[int]) -> str:
    """A prompt of exactly len(prompt_ids) tokens, one word per id."""
    words = _single_token_words()
    return "".join(words[i % len(words)] for i in prompt_ids)
