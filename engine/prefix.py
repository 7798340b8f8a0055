"""The identity of a full KV block for prefix caching: a hash chained over the blocks before it (vLLM, nano-vllm).

Block i of a sequence is named by hash((name of block i-1, its own tokens)), block 0's "previous name" being the
request's cache salt: two blocks share a name only when every token up to their end is the same, under the same
salt. Plain data, no torch and no numpy: the engine names the blocks it caches (engine/kv_cache.py) and an HTTP
worker names a prompt's blocks the same way to route it where they are cached (serving/router.py). Python's hash
of a tuple of ints is the same in every process (only str and bytes hashes are salted per process), so the salt
string is first turned into an int by sha256.
"""
import hashlib
from collections.abc import Iterator

NO_SALT = 0


def salt_key(salt: str | None) -> int:
    """The chain's start for a request's cache_salt (requests with different salts never share a block)."""
    if not salt:
        return NO_SALT
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")


def chain(previous: int, tokens: tuple[int, ...]) -> int:
    return hash((previous, tokens))


def block_hashes(token_ids: list[int], block_size: int, salt: int = NO_SALT, start: int = 0,
                 previous: int | None = None) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(name, tokens) of each full block of token_ids from block `start` on (whose previous name is `previous`,
    or the salt for block 0)."""
    h = salt if previous is None else previous
    for i in range(start, len(token_ids) // block_size):
        tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
        h = chain(h, tokens)
        yield h, tokens


def cacheable_block_hashes(token_ids: list[int], block_size: int,
                           salt: int = NO_SALT) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(name, tokens) of the first full blocks of token_ids that may come from the cache: all but the one holding
    its last token, which is always computed, since the step that computes it gives the logits of the next."""
    return block_hashes(token_ids[:(len(token_ids) - 1) // block_size * block_size], block_size, salt)
