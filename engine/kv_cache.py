"""Paged KV memory: a pool of fixed-size blocks and a block table per sequence.

Only bookkeeping lives here (which block belongs to whom, and where a token's K/V sits); the cache tensors
themselves belong to the model runner. The scheduler asks before it acts: `can_allocate` / `allocate` at
admission, `can_grow` / `grow` before each step, `free` when a sequence finishes, fails, is aborted or preempted.

The pool has one block more than it hands out: padding rows of a CUDA-graph step write their K/V into that
spare block (`pad_slot`), so a padded step never touches a block that belongs to a sequence.
"""
from collections import deque

import numpy as np


def slot_mapping(block_tables: np.ndarray, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """The flat cache slot of each token: sequence `rows[i]` (a row of `block_tables`) at `positions[i]`.
    The one place the paging formula is written."""
    return block_tables[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size


class BlockManager:
    """Block tables live twice: as lists (the bookkeeping) and as rows of one numpy array, so a step gathers
    all of its tables with one indexing operation instead of a Python loop over sequences."""

    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int = 64):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_slot = num_blocks * block_size  # first slot of the spare block, past every block handed out
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}  # sequence id -> its block ids, in order
        self.rows: dict[int, int] = {}  # sequence id -> its row of table_rows
        self.free_rows: list[int] = []
        self.table_rows = np.zeros((0, max_blocks_per_seq), dtype=np.int32)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1 - self.num_free / self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_free

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        assert seq_id not in self.tables, f"sequence {seq_id} already holds blocks"
        self.tables[seq_id] = []
        if not self.free_rows:  # twice the rows: amortised growth
            n = len(self.table_rows)
            self.table_rows = np.concatenate([self.table_rows, np.zeros((max(n, 16), self.table_rows.shape[1]),
                                                                        dtype=np.int32)])
            self.free_rows = list(range(len(self.table_rows) - 1, n - 1, -1))
        self.rows[seq_id] = self.free_rows.pop()
        self.grow(seq_id, num_tokens)

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(self.tables[seq_id]) <= self.num_free

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Make the sequence's table hold at least num_tokens slots."""
        table = self.tables[seq_id]
        missing = self.blocks_needed(num_tokens) - len(table)
        if missing <= 0:
            return
        assert missing <= self.num_free, "grow() without can_grow()"
        new = [self.free_blocks.popleft() for _ in range(missing)]
        self.table_rows[self.rows[seq_id], len(table):len(table) + missing] = new
        table.extend(new)

    def free(self, seq_id: int) -> None:
        self.free_blocks.extend(self.tables.pop(seq_id, ()))
        if seq_id in self.rows:
            self.free_rows.append(self.rows.pop(seq_id))

    def check(self, owners: set[int]) -> None:
        """Raise AssertionError unless every block and every table row is free (once) or held by exactly one of
        `owners` (the live sequences that should hold blocks), and each row spells its sequence's table."""
        assert set(self.tables) == owners, f"blocks held by {sorted(set(self.tables) ^ owners)}: not live, or lost"
        assert set(self.rows) == owners, f"table rows held by {sorted(set(self.rows) ^ owners)}: not live, or lost"
        held = [b for table in self.tables.values() for b in table]
        everything = held + list(self.free_blocks)
        assert len(everything) == len(set(everything)) == self.num_blocks and set(everything) == set(
            range(self.num_blocks)), "a block is held twice, held and free, listed free twice, or lost"
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
