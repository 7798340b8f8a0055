"""Paged attention in plain PyTorch: the CPU path, and the oracle the Triton kernels are tested against.

Decodes attend in padded batches of similar context length: a batch's blocks are gathered into a (D, T) buffer, T
a whole number of blocks covering its longest context, with a mask. Prefill chunks attend in packed groups: a
group's keys are gathered by slot and a mask keeps each query to its own sequence's earlier positions.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata, StepInputs
from engine.kv_cache import slot_mapping

# A group's mask covers all of its queries x all of its keys. Sequences join a group while that costs at most
# twice the useful query-key pairs, or while the group is this small anyway: many short prompts take one call,
# long ones are not multiplied by each other.
SMALL_GROUP_PAIRS = 1 << 16
# Decodes join a padded batch, longest context first, while its blocks stay within DECODE_PADDING times the blocks
# of its members' own contexts: a few gathers and SDPA calls per layer cost less than padding every decode to the
# longest (CPU offline, contexts spread over ~100 tokens: 16% less time in them on one thread).
DECODE_PADDING = 1.25


@dataclass
class DecodeBatch:
    rows: torch.Tensor | slice  # (D,) rows of its decodes in the packed batch (a slice when it is every decode)
    tables: torch.Tensor  # (D, blocks) block ids covering its longest context
    mask: torch.Tensor  # (D, 1, 1, blocks * block_size) True inside each sequence's context


@dataclass
class PrefillGroup:
    rows: torch.Tensor  # (P,) rows of the group's query tokens in the packed batch
    key_slots: torch.Tensor  # (K,) cache slots of every context token of the group's sequences
    mask: torch.Tensor  # (P, K) True where the query may attend to the key


@dataclass
class ReferencePlan:
    decode_batches: list[DecodeBatch]
    prefill_groups: list[PrefillGroup]
    scratch: dict = field(default_factory=dict)  # gather buffers the layers of one step reuse

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, meta)


def plan(step: StepInputs, block_size: int, device: torch.device) -> ReferencePlan:
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
    D = step.num_decodes
    starts = np.cumsum(step.query_lens) - step.query_lens

    def batch_of(rows: np.ndarray) -> DecodeBatch:
        ctx = as_tensor(step.context_lens[rows])
        width = -(-int(step.context_lens[rows].max()) // block_size)
        mask = torch.arange(width * block_size, device=device)[None, :] < ctx[:, None]
        return DecodeBatch(rows=slice(0, D) if len(rows) == D else as_tensor(rows),
                           tables=as_tensor(step.block_tables[rows, :width]), mask=mask[:, None, None, :])

    def group_of(seqs: list[int]) -> PrefillGroup:
        n, ctx = step.query_lens[seqs], step.context_lens[seqs]
        q_rows = np.concatenate([np.arange(starts[b], starts[b] + step.query_lens[b]) for b in seqs])
        q_seq, k_seq = np.repeat(np.arange(len(seqs)), n), np.repeat(np.arange(len(seqs)), ctx)
        q_pos = np.concatenate([np.arange(c - m, c) for m, c in zip(n, ctx)])  # a chunk ends its context
        k_pos = np.concatenate([np.arange(c) for c in ctx])
        key_slots = slot_mapping(step.block_tables, np.asarray(seqs)[k_seq], k_pos, block_size)
        q_seq, q_pos, k_seq, k_pos = map(as_tensor, (q_seq, q_pos, k_seq, k_pos))
        mask = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
        return PrefillGroup(as_tensor(q_rows), as_tensor(key_slots), mask)

    groups: list[list[int]] = []
    queries = keys = useful = 0
    for b in range(D, len(step.query_lens)):
        n, ctx = int(step.query_lens[b]), int(step.context_lens[b])
        if groups and (queries + n) * (keys + ctx) <= max(2 * (useful + n * ctx), SMALL_GROUP_PAIRS):
            groups[-1].append(b)
            queries, keys, useful = queries + n, keys + ctx, useful + n * ctx
        else:
            groups.append([b])
            queries, keys, useful = n, ctx, n * ctx
    return ReferencePlan(
        decode_batches=[batch_of(rows) for rows in decode_batches(step.context_lens[:D], block_size)],
        prefill_groups=[group_of(g) for g in groups],
    )


def decode_batches(context_lens: np.ndarray, block_size: int) -> list[np.ndarray]:
    """The decodes' rows in batches of similar context length (DECODE_PADDING); all of them in their order when
    they make one batch."""
    blocks = -(-context_lens // block_size)
    order = np.argsort(-blocks, kind="stable")
    batches: list[list[int]] = []
    width = own = 0
    for row in order:
        if batches and (len(batches[-1]) + 1) * width <= DECODE_PADDING * (own + blocks[row]):
            batches[-1].append(row)
            own += blocks[row]
        else:
            batches.append([row])
            width = own = blocks[row]
    if len(batches) == 1:
        return [np.arange(len(context_lens))]
    return [np.asarray(rows) for rows in batches]


def _gather_decode_kv(cache: torch.Tensor, plan: ReferencePlan, batch: int, name: str) -> torch.Tensor:
    """A decode batch's cached K or V, block by block, into a buffer every layer of the step reuses (a fresh
    allocation per layer costs more than the copy on the CPU). (D, blocks * block_size, nh, hs)."""
    D, W = plan.decode_batches[batch].tables.shape
    if (name, batch) not in plan.scratch:
        plan.scratch[name, batch] = cache.new_empty((D * W,) + cache.shape[1:])
    out = plan.scratch[name, batch]
    torch.index_select(cache, 0, plan.decode_batches[batch].tables.flatten(), out=out)
    return out.view(D, W * cache.shape[1], *cache.shape[2:])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """Causal attention of each new token over its own sequence's cached tokens.
    q: (N, nh, hs); caches: (num_blocks, block_size, nh, hs)."""
    plan: ReferencePlan = meta.reference
    out = torch.empty_like(q)
    for i, batch in enumerate(plan.decode_batches):
        k = _gather_decode_kv(k_cache, plan, i, "k")  # (D, T, nh, hs)
        v = _gather_decode_kv(v_cache, plan, i, "v")
        y = F.scaled_dot_product_attention(q[batch.rows].unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=batch.mask)  # (D, nh, 1, hs)
        out[batch.rows] = y.squeeze(2)
    nh, hs = q.shape[1:]
    for group in plan.prefill_groups:
        k = k_cache.view(-1, nh, hs)[group.key_slots].transpose(0, 1)  # (nh, K, hs)
        v = v_cache.view(-1, nh, hs)[group.key_slots].transpose(0, 1)
        y = F.scaled_dot_product_attention(q[group.rows].transpose(0, 1), k, v, attn_mask=group.mask)  # (nh, P, hs)
        out[group.rows] = y.transpose(0, 1)
    return out
