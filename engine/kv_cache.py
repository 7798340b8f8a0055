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

    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_slot = num_blocks * block_size  # first slot of the spare block, past every block handed out
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}  # sequence id -> its block ids, in order

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
        self.grow(seq_id, num_tokens)

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(self.tables[seq_id]) <= self.num_free

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Make the sequence's table hold at least num_tokens slots."""
        table = self.tables[seq_id]
        missing = self.blocks_needed(num_tokens) - len(table)
        assert missing <= self.num_free, "grow() without can_grow()"
        table.extend(self.free_blocks.popleft() for _ in range(max(missing, 0)))

    def free(self, seq_id: int) -> None:
        self.free_blocks.extend(self.tables.pop(seq_id, ()))

    def table_array(self, seq_ids: list[int], width: int | None = None) -> np.ndarray:
        """(len(seq_ids), width) int32 block tables, zero past each sequence's blocks (never read there); width
        defaults to the longest table."""
        tables = [self.tables[seq_id] for seq_id in seq_ids]
        out = np.zeros((len(tables), width or max(map(len, tables))), dtype=np.int32)
        for row, table in enumerate(tables):
            out[row, :len(table)] = table
        return out
