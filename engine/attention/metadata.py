"""Where a step's tokens sit in the paged KV cache, built once per step on the host from numpy arrays, so no
layer has to synchronise with the device to read it.

A step packs B sequences with no padding, decodes first: rows 0..D-1 are one new token each (a decode, or a
prompt's single last token), then the prefill chunks of the other B-D sequences, each chunk the last n tokens
of its sequence's context (earlier tokens may already be cached: chunked prefill, recompute after preemption).
"""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from engine.kv_cache import slot_mapping

BLOCK_M = 64  # query rows per prefill tile (fewer when every chunk is short: tl.dot needs at least 16)
# a prefix is attended to once for the decodes that share it when it saves re-reading at least this much: fewer
# decodes or tokens save less than the two launches it adds (triton_shared.py)
MIN_SHARING_DECODES = 16
MIN_SHARED_TOKENS = 128
SHARED_SPLIT_TOKENS = 256  # prefix tokens per program of the shared-prefix kernel


class PrefixShare(NamedTuple):
    """On the host: the cached blocks that many decodes of a step begin with (find_shared_prefix)."""
    table: np.ndarray  # (blocks,) the prefix's blocks
    lens: np.ndarray  # (D,) per decode: the prefix's tokens if it takes part, else 0

    @property
    def tokens(self) -> int:
        return int(self.lens.max())


class SharedPrefix(NamedTuple):
    """The cached blocks that many decodes of a step begin with, attended to once for all of them
    (triton_shared.py: cascade attention)."""
    table: torch.Tensor  # (W,) the prefix's blocks
    length: torch.Tensor  # (1,) its tokens, a whole number of blocks
    lens: torch.Tensor  # (D,) per decode: the prefix's length if it takes part, else 0
    splits: int  # partitions of the prefix (a host int, fixed for a captured graph)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (N,) int64: the cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # (B, W) int32 (int64 in the decode graphs): each sequence's blocks, decodes first
    context_lens: torch.Tensor  # (B,) int32 or int64: tokens each sequence attends to, this step's included
    num_decodes: int  # D
    query_start: torch.Tensor  # (B-D+1,) int32: prefill s owns rows D+query_start[s] .. D+query_start[s+1]-1
    prefill_work: torch.Tensor  # (items, 2): the prefill kernel's (sequence, query tile) list
    block_m: int  # query rows per tile of that list
    # the plain PyTorch attention's plan (CPU path and oracle: reference.ReferencePlan; with BATCH_INVARIANT,
    # invariant.InvariantPlan), whose attend() runs it; None on the Triton path
    reference: object | None = None
    shared: SharedPrefix | None = None  # a prefix the decodes share (Triton path)


@dataclass
class StepInputs:
    """One packed step on the host: what the model reads besides the metadata."""
    positions: np.ndarray  # (N,) int64
    slots: np.ndarray  # (N,) int64
    query_lens: np.ndarray  # (B,) int64
    context_lens: np.ndarray  # (B,) int64
    block_tables: np.ndarray  # (B, W) int32
    num_decodes: int


def pack_step(query_lens: np.ndarray, context_lens: np.ndarray, block_tables: np.ndarray,
              block_size: int) -> StepInputs:
    """Positions and cache slots of every new token, vectorised: sequence b contributes query_lens[b] tokens,
    the last ones of its context_lens[b]. Decodes (query length 1) must come first."""
    prefills = np.flatnonzero(query_lens != 1)
    num_decodes = int(prefills[0]) if len(prefills) else len(query_lens)
    assert len(prefills) == len(query_lens) - num_decodes, "decodes must come first in a step"
    if not len(prefills):  # a decode step: one row per sequence, at the end of its context
        rows, positions = np.arange(len(query_lens)), context_lens - 1
    else:
        rows = np.repeat(np.arange(len(query_lens)), query_lens)
        starts = np.cumsum(query_lens) - query_lens  # first row of each sequence
        positions = np.arange(len(rows)) - starts[rows] + (context_lens - query_lens)[rows]
    return StepInputs(positions, slot_mapping(block_tables, rows, positions, block_size), query_lens,
                      context_lens, block_tables, num_decodes)


def block_m_for(max_query_len: int) -> int:
    return min(BLOCK_M, max(16, 1 << (max_query_len - 1).bit_length()))


def prefill_work(query_lens: np.ndarray, context_lens: np.ndarray, block_m: int,
                 num_items: int | None = None) -> np.ndarray:
    """(items, 2) int32 (sequence, query tile) pairs, the tiles with the most keys first; padded with -1 rows up to
    num_items when given."""
    tiles = -(-np.asarray(query_lens) // block_m)
    seqs = np.repeat(np.arange(len(tiles)), tiles)
    m_blocks = np.arange(len(seqs)) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    tile_keys = (np.asarray(context_lens) - np.asarray(query_lens))[seqs] + m_blocks * block_m  # about the keys read
    order = np.argsort(-tile_keys, kind="stable")
    work = np.full((num_items or len(seqs), 2), -1, dtype=np.int32)
    work[:len(seqs)] = np.stack([seqs[order], m_blocks[order]], axis=1)
    return work


def find_shared_prefix(step: StepInputs, block_size: int) -> PrefixShare | None:
    """The blocks that most of the step's decodes begin with, and which decodes take part, or None when too few
    decodes or tokens share them. Decodes whose first block is the most common one form the group; the prefix is the
    leading blocks all of them hold, short of each one's last token (its own, being written this step)."""
    D = step.num_decodes
    if D < MIN_SHARING_DECODES:
        return None
    tables = step.block_tables[:D]
    firsts, counts = np.unique(tables[:, 0], return_counts=True)
    if counts.max() < MIN_SHARING_DECODES:
        return None
    members = tables[:, 0] == firsts[counts.argmax()]
    group = tables[members]
    same = (group == group[0]).all(axis=0)
    blocks = len(same) if same.all() else int(same.argmin())
    blocks = min(blocks, int(step.context_lens[:D][members].min() - 1) // block_size)
    if blocks * block_size < MIN_SHARED_TOKENS:
        return None
    return PrefixShare(table=group[0, :blocks], lens=np.where(members, blocks * block_size, 0))


def shared_splits(max_tokens: int) -> int:
    """Partitions of the shared-prefix kernel for a prefix of at most max_tokens."""
    return -(-max_tokens // SHARED_SPLIT_TOKENS)


def build_metadata(step: StepInputs, device: torch.device, all_prefill: bool = False,
                   shared: PrefixShare | None = None) -> AttentionMetadata:
    """The Triton kernels' metadata; with all_prefill (BATCH_INVARIANT) every row goes through the prefill kernel,
    decodes too, in query tiles of BLOCK_M rows whatever the step (as in the mixed CUDA graphs), so that a token's
    attention is the same arithmetic in any step. `shared` (find_shared_prefix's): a prefix the decodes attend to
    together."""
    as_tensor = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(device, dtype, non_blocking=True)
    D = 0 if all_prefill else step.num_decodes
    prefill_lens = step.query_lens[D:]
    block_m = BLOCK_M if all_prefill else block_m_for(int(prefill_lens.max(initial=1)))
    meta = AttentionMetadata(
        slot_mapping=as_tensor(step.slots, torch.int64),
        block_tables=as_tensor(step.block_tables, torch.int32),
        context_lens=as_tensor(step.context_lens, torch.int32),
        num_decodes=D,
        query_start=as_tensor(np.concatenate([[0], np.cumsum(prefill_lens)]), torch.int32),
        prefill_work=as_tensor(prefill_work(prefill_lens, step.context_lens[D:], block_m), torch.int32),
        block_m=block_m,
    )
    if shared and D:
        meta.shared = SharedPrefix(table=as_tensor(shared.table, torch.int32),
                                   length=as_tensor(np.array([shared.tokens]), torch.int32),
                                   lens=as_tensor(shared.lens, torch.int32), splits=shared_splits(shared.tokens))
    return meta
