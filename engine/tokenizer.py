"""GPT-2's byte-pair tokenizer, offline, and a streaming detokenizer.

tiktoken's `get_encoding("gpt2")` downloads its ranks from a hub; we build the same encoding from the public
ranks file shipped in `assets/gpt2.tiktoken` (from the openai-whisper package), so the server works without
network access and never waits on one.
"""
import base64
import codecs
import functools
import os

import tiktoken

RANKS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "gpt2.tiktoken")
# GPT-2's pre-tokenizer split pattern, as tiktoken defines it for "gpt2".
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TOKEN = 50256
VOCAB_SIZE = EOT_TOKEN + 1  # a checkpoint may pad its embedding past this (nanoGPT's 50304): no text there


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    with open(RANKS_FILE, "rb") as f:
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=EOT_TOKEN + 1,
    )


def encode(text: str) -> list[int]:
    # Special tokens in user text are plain text: a prompt cannot inject <|endoftext|>.
    return get_tokenizer().encode_ordinary(text)


def decode(tokens: list[int]) -> str:
    return get_tokenizer().decode(tokens, errors="replace")


class StreamDecoder:
    """Turns a token stream into text deltas; a character split across tokens is held back until complete."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(get_tokenizer().decode_single_token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
