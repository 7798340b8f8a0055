"""Paged KV memory: a pool of fixed-size blocks, a block table per sequence, and the prefix cache.

Only bookkeeping lives here (which block belongs to whom, and where a token's K/V sits); the cache tensors
themselves belong to the model runner. The scheduler asks before it acts: `allocate` at admission (it says how
many of the sequence's tokens the cache already holds, or None if the pool is short), `can_grow` / `grow` before
each step, `cache_scheduled` as it plans a sequence's tokens, `free` when a sequence finishes, fails, is aborted
or preempted.

Prefix caching (engine/prefix.py names the blocks): every full block whose tokens are known is registered under
its chained hash as soon as a step is planned to compute it (as vLLM does), so that requests admitted in the same
step share it too: the step writes every token's K/V before any attention reads the cache, in every layer. If
that step fails, its blocks are forgotten (`forget`) and the sequences that hold them fail with it. Blocks are
reference-counted, so sequences with the same prefix share its blocks. A block no sequence holds keeps its K/V
and its name while it waits among the cached free blocks, least recently released first; the pool takes a block
from there (forgetting its name) only when no plain free block is left, so free space counts both. A sequence
admitted later (or a preempted one coming back) starts from its longest chain of cached blocks and computes the
rest. Shared blocks are always full, and a sequence only ever writes past its cached prefix, so no sequence
writes into a block another reads.

The pool has one block more than it hands out: padding rows of a CUDA-graph step write their K/V into that
spare block (`pad_slot`), so a padded step never touches a block that belongs to a sequence.
"""
from collections import OrderedDict, deque

import numpy as np

from engine.prefix import NO_SALT, block_hashes, cacheable_block_hashes


def slot_mapping(block_tables: np.ndarray, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """The flat cache slot of each token: sequence `rows[i]` (a row of `block_tables`) at `positions[i]`.
    The one place the paging formula is written."""
    return block_tables[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size


class BlockManager:
    """Block tables live twice: as lists (the bookkeeping) and as rows of one numpy array, so a step gathers
    all of its tables with one indexing operation instead of a Python loop over sequences."""

    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int = 64, prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.pad_slot = num_blocks * block_size  # first slot of the spare block, past every block handed out
        self.free_blocks: deque[int] = deque(range(num_blocks))  # hold nothing worth keeping
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # held by no sequence, named: LRU order
        self.ref_counts = [0] * num_blocks
        self.block_of_hash: dict[int, int] = {}
        self.hash_of_block: dict[int, int] = {}
        self.tokens_of_block: dict[int, tuple[int, ...]] = {}  # a named block's tokens: a hash hit is checked
        self.tables: dict[int, list[int]] = {}  # sequence id -> its block ids, in order
        self.hashes: dict[int, list[int]] = {}  # sequence id -> names of its first full, computed blocks
        self.salts: dict[int, int] = {}  # sequence id -> its chain's start (engine/prefix.py)
        self.rows: dict[int, int] = {}  # sequence id -> its row of table_rows
        self.free_rows: list[int] = []
        self.table_rows = np.zeros((0, max_blocks_per_seq), dtype=np.int32)
        self.named: list[int] = []  # blocks named since the engine last took the list (take_named)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks) + len(self.cached_free)

    @property
    def usage(self) -> float:
        return 1 - self.num_free / self.num_blocks

    def cached_prefix(self, token_ids: list[int], salt: int = NO_SALT) -> list[int]:
        """The cached blocks of the longest cached chain of token_ids' first full blocks (never its last token)."""
        if not self.prefix_caching:
            return []
        blocks = []
        for h, tokens in cacheable_block_hashes(token_ids, self.block_size, salt):
            block = self.block_of_hash.get(h)
            if block is None or self.tokens_of_block[block] != tokens:
                break
            blocks.append(block)
        return blocks

    def allocate(self, seq_id: int, token_ids: list[int], salt: int = NO_SALT) -> int | None:
        """Give a sequence blocks for its tokens, its cached prefix shared: how many of its tokens the cache holds
        already, or None (nothing done) if the pool cannot hold the rest."""
        assert seq_id not in self.tables, f"sequence {seq_id} already holds blocks"
        cached = self.cached_prefix(token_ids, salt)
        revived = sum(self.ref_counts[b] == 0 for b in cached)  # counted free until now
        if self.blocks_needed(len(token_ids)) - len(cached) > self.num_free - revived:
            return None
        for block in cached:
            if self.ref_counts[block] == 0:
                del self.cached_free[block]
            self.ref_counts[block] += 1
        if not self.free_rows:  # twice the rows: amortised growth
            n = len(self.table_rows)
            self.table_rows = np.concatenate([self.table_rows, np.zeros((max(n, 16), self.table_rows.shape[1]),
                                                                        dtype=np.int32)])
            self.free_rows = list(range(len(self.table_rows) - 1, n - 1, -1))
        self.rows[seq_id] = row = self.free_rows.pop()
        self.table_rows[row, :len(cached)] = cached
        self.tables[seq_id] = list(cached)
        self.hashes[seq_id] = [self.hash_of_block[b] for b in cached]
        self.salts[seq_id] = salt
        self.grow(seq_id, len(token_ids))
        return len(cached) * self.block_size

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(self.tables[seq_id]) <= self.num_free

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Make the sequence's table hold at least num_tokens slots."""
        table = self.tables[seq_id]
        missing = self.blocks_needed(num_tokens) - len(table)
        if missing <= 0:
            return
        assert missing <= self.num_free, "grow() without can_grow()"
        new = [self._take_block() for _ in range(missing)]
        self.table_rows[self.rows[seq_id], len(table):len(table) + missing] = new
        table.extend(new)

    def _take_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:  # evict the least recently released cached block
            block = self._evict()
        self.ref_counts[block] = 1
        return block

    def _evict(self) -> int:
        block, _ = self.cached_free.popitem(last=False)
        del self.block_of_hash[self.hash_of_block.pop(block)], self.tokens_of_block[block]
        return block

    def clear_cache(self) -> None:
        """Forget every cached block that no sequence holds (a benchmark's cold start)."""
        while self.cached_free:
            self.free_blocks.append(self._evict())

    def cache_scheduled(self, plan: list) -> None:
        """Name the full blocks that a step computes, as planned: (sequence, tokens it feeds) pairs, whose blocks
        up to num_computed + tokens hold known tokens (of its `token_ids`). Called for a step's whole plan at
        once: a comparison for each sequence that fills no block."""
        if not self.prefix_caching:
            return
        hashes, bs = self.hashes, self.block_size
        for seq, n in plan:
            full = min(seq.num_computed + n, len(seq.token_ids)) // bs
            if full > len(hashes[seq.id]):
                self._name_blocks(seq.id, seq.token_ids, full)

    def take_named(self) -> list[int]:
        """The blocks named since the last call: those a step about to be launched computes."""
        named, self.named = self.named, []
        return named

    def forget(self, blocks: list[int], later: list[int]) -> set[int]:
        """Unname blocks whose K/V were never computed (their step failed), and those of `later` (named by the
        step after it, already launched) that sequences holding them hold too, since they were computed from
        them: the sequences that hold any of these, which cannot go on."""
        holders = self._unname(blocks)
        tainted = [b for b in later if any(b in self.tables[seq_id] for seq_id in holders)]
        return holders | self._unname(tainted)

    def _unname(self, blocks: list[int]) -> set[int]:
        lost = set(blocks)
        for block in lost:
            h = self.hash_of_block.pop(block, None)
            if h is None:
                continue
            del self.block_of_hash[h], self.tokens_of_block[block]
            if block in self.cached_free:
                del self.cached_free[block]
                self.free_blocks.append(block)
        return {seq_id for seq_id, table in self.tables.items() if not lost.isdisjoint(table)}

    def _name_blocks(self, seq_id: int, token_ids: list[int], full: int) -> None:
        """Name the sequence's blocks up to its `full`-th. A block whose name another block holds already
        (computed twice, by sequences admitted together) stays unnamed and returns to the plain free blocks."""
        hashes, table = self.hashes[seq_id], self.tables[seq_id]
        for h, tokens in block_hashes(token_ids[:full * self.block_size], self.block_size, self.salts[seq_id],
                                      start=len(hashes), previous=hashes[-1] if hashes else None):
            block = table[len(hashes)]
            hashes.append(h)
            if h not in self.block_of_hash:
                self.block_of_hash[h], self.hash_of_block[block], self.tokens_of_block[block] = block, h, tokens
                self.named.append(block)

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks; a named one stays cached until the pool needs it. The last block is
        released first, so of one sequence's blocks the tail is evicted first and the shared head stays."""
        for block in reversed(self.tables.pop(seq_id, ())):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.hash_of_block:
                    self.cached_free[block] = None
                else:
                    self.free_blocks.append(block)
        self.hashes.pop(seq_id, None)
        self.salts.pop(seq_id, None)
        if seq_id in self.rows:
            self.free_rows.append(self.rows.pop(seq_id))

    def check(self, owners: set[int]) -> None:
        """Raise AssertionError unless every block is either held (its reference count is the number of tables
        that list it) or free exactly once (plain, or cached with a name), names and blocks map one to one, only
        named blocks are shared, every table row is free (once) or held by exactly one of `owners` (the live
        sequences that should hold blocks), and each row spells its sequence's table."""
        for name, d in (("blocks", self.tables), ("table rows", self.rows), ("hashes", self.hashes)):
            assert set(d) == owners, f"{name} held by {sorted(set(d) ^ owners)}: not live, or lost"
        counts = [0] * self.num_blocks
        for seq_id, table in self.tables.items():
            assert len(table) == len(set(table)), f"sequence {seq_id} lists a block twice"
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "a block's reference count is not the number of tables that hold it"
        free = list(self.free_blocks) + list(self.cached_free)
        assert len(free) == len(set(free)), "a block is listed free twice"
        assert sorted(free) == [b for b in range(self.num_blocks) if counts[b] == 0], \
            "a block is held and free, or lost"
        assert all(b in self.hash_of_block for b in self.cached_free), "an unnamed block waits among the cached"
        assert not any(b in self.hash_of_block for b in self.free_blocks), "a named block is among the plain free"
        assert all(self.hash_of_block.get(b) == h for h, b in self.block_of_hash.items()) and \
            len(self.block_of_hash) == len(self.hash_of_block) == len(self.tokens_of_block), "names and blocks differ"
        assert all(counts[b] <= 1 or b in self.hash_of_block for b in range(self.num_blocks)), \
            "an unnamed block is shared"
        for seq_id, hashes in self.hashes.items():
            assert len(hashes) <= len(self.tables[seq_id]), f"sequence {seq_id} names blocks it does not hold"
        rows = list(self.rows.values()) + self.free_rows
        assert len(rows) == len(set(rows)) == len(self.table_rows) and set(rows) == set(range(len(self.table_rows))), \
            "a table row is held twice, held and free, listed free twice, or lost"
        for seq_id, table in self.tables.items():
            assert self.table_rows[self.rows[seq_id], :len(table)].tolist() == table, f"row of {seq_id} is stale"

    def table_array(self, seq_ids: list[int], width: int | None = None) -> np.ndarray:
        """(len(seq_ids), width) int32 block tables; past a sequence's blocks the entries are stale (never read
        there). width defaults to the longest table."""
        width = width or max(len(self.tables[seq_id]) for seq_id in seq_ids)
        return self.table_rows[[self.rows[seq_id] for seq_id in seq_ids], :width]
