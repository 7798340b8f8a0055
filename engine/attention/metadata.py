"""Where a step's tokens sit in the paged KV cache, built once per step on the host from numpy arrays, so no
layer has to synchronise with the device to read it.

A step packs B sequences with no padding, decodes first: rows 0..D-1 are one new token each (a decode, or a
prompt's single last token), then the prefill chunks of the other B-D sequences, each chunk the last n tokens
of its sequence's context (earlier tokens may already be cached: chunked prefill, recompute after preemption).
"""
from dataclasses import dataclass

import numpy as np
import torch

from engine.kv_cache import slot_mapping

BLOCK_M = 64  # query rows per prefill tile (fewer when every chunk is short: tl.dot needs at least 16)


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


def build_metadata(step: StepInputs, device: torch.device, all_prefill: bool = False) -> AttentionMetadata:
    """The Triton kernels' metadata; with all_prefill (BATCH_INVARIANT) every row goes through the prefill kernel,
    decodes too, in query tiles of BLOCK_M rows whatever the step (as in the mixed CUDA graphs), so that a token's
    attention is the same arithmetic in any step."""
    as_tensor = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(device, dtype, non_blocking=True)
    D = 0 if all_prefill else step.num_decodes
    prefill_lens = step.query_lens[D:]
    block_m = BLOCK_M if all_prefill else block_m_for(int(prefill_lens.max(initial=1)))
    return AttentionMetadata(
        slot_mapping=as_tensor(step.slots, torch.int64),
        block_tables=as_tensor(step.block_tables, torch.int32),
        context_lens=as_tensor(step.context_lens, torch.int32),
        num_decodes=D,
        query_start=as_tensor(np.concatenate([[0], np.cumsum(prefill_lens)]), torch.int32),
        prefill_work=as_tensor(prefill_work(prefill_lens, step.context_lens[D:], block_m), torch.int32),
        block_m=block_m,
    )
