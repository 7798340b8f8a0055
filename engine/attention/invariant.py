"""Batch-invariant attention and linear layers (BATCH_INVARIANT): a token's every number is bitwise the same
whatever else its step holds (how many other tokens, of which requests, in which rows), so a request gets the
same tokens alone, in any batch, under every policy, chunked or not, after a preemption or a prefix-cache hit.

Matrix products reduce in an order their library picks by shape, and the shape of a step's products is its
number of rows: on this project's CPU a row of `x @ W` changes with the number of rows of x. So every product
here has a fixed shape: a linear layer runs on tiles of ROW_TILE rows (the last one padded), and attention runs
each sequence's queries in tiles of QUERY_TILE rows against its keys in tiles of KEY_TILE positions, always
starting at position 0, with an online softmax over the key tiles in order (flash attention's, written out).
Key tiles past a query's position are masked whole: they change nothing (a factor of exactly 1 and a sum of
exact zeros), so a decode and a long prefill chunk give the same numbers. Layer norm, GELU and the sampler work
row by row already; the sampler's draws are keyed by (seed, position).

The price: padding (a decode runs a 16-row tile of copies of itself) and many small products: on this project's
CPU, one thread, 38-44% of the default mode's tokens/s with batching, 30-31% for nobatch
(bench/results/cpu/batch-invariant).
The CPU's path: the GPU's ("triton-invariant") takes engine/triton_linear.py's products and the prefill kernel
for every row (tests/test_batch_invariant_gpu.py, passed on an H100).
tests/test_batch_invariant.py checks the property itself.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata, StepInputs
from engine.kv_cache import slot_mapping

ROW_TILE = 16  # rows of a linear layer's product
# queries of an attention product; a decode fills a tile with copies of itself, but one-row products (batched
# over tiles and heads) gave rows that changed with the number of tiles on this project's CPU
QUERY_TILE = 16
KEY_TILE = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear over fixed tiles of ROW_TILE rows, as one batched product: the same numbers as a product per tile
    (bitwise, on this project's CPU), and with two threads in 45-75% of its time (one call, both cores busy)."""
    n, width = x.shape
    tiles = F.pad(x, (0, 0, 0, -n % ROW_TILE)).view(-1, ROW_TILE, width)
    weights = weight.t().expand(len(tiles), width, weight.shape[0])  # a view: no copy per tile
    out = torch.bmm(tiles, weights) if bias is None else torch.baddbmm(bias, tiles, weights)
    return out.reshape(-1, weight.shape[0])[:n]


@dataclass
class InvariantPlan:
    """The step's query tiles: each QUERY_TILE rows of one sequence (the last row repeated to fill a tile), their
    positions, and the cache slots of that sequence's key positions 0 .. tiles * KEY_TILE - 1 (past its context:
    its first slot, masked)."""
    rows: torch.Tensor  # (T, QUERY_TILE) rows of the packed batch
    positions: torch.Tensor  # (T, QUERY_TILE)
    key_slots: torch.Tensor  # (T, key_tiles * KEY_TILE)
    real: torch.Tensor  # (T, QUERY_TILE) bool: not a repeated row

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, self)


def plan(step: StepInputs, block_size: int, device: torch.device) -> InvariantPlan:
    starts = np.cumsum(step.query_lens) - step.query_lens
    rows, positions, owners = [], [], []
    for b, (n, ctx) in enumerate(zip(step.query_lens, step.context_lens)):
        for first in range(0, n, QUERY_TILE):
            tile = np.arange(first, min(first + QUERY_TILE, n))
            tile = np.concatenate([tile, np.full(QUERY_TILE - len(tile), tile[-1])])
            rows.append(starts[b] + tile)
            positions.append(ctx - n + tile)
            owners.append(b)
    key_positions = np.arange(-(-int(step.context_lens.max()) // KEY_TILE) * KEY_TILE)
    owners = np.asarray(owners)
    context = step.context_lens[owners][:, None]
    inside = np.where(key_positions[None, :] < context, key_positions[None, :], 0)
    slots = slot_mapping(step.block_tables, np.repeat(owners, len(key_positions)), inside.ravel(), block_size)
    rows = np.asarray(rows)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    real = np.concatenate([[True], rows.ravel()[1:] != rows.ravel()[:-1]]).reshape(rows.shape)
    return InvariantPlan(as_tensor(rows.astype(np.int64)), as_tensor(np.asarray(positions, dtype=np.int64)),
                         as_tensor(slots.reshape(len(owners), -1)), as_tensor(real))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    plan: InvariantPlan) -> torch.Tensor:
    """Causal attention of each new token over its sequence's cached tokens. q: (N, nh, hs); caches:
    (num_blocks, block_size, nh, hs), this step's K/V written."""
    nh, hs = q.shape[1:]
    k_flat, v_flat = k_cache.view(-1, nh, hs), v_cache.view(-1, nh, hs)
    queries = q[plan.rows].transpose(1, 2)  # (T, nh, QUERY_TILE, hs)
    T = queries.shape[0]
    best = torch.full((T, nh, QUERY_TILE), -math.inf, dtype=torch.float32, device=q.device)
    total = torch.zeros((T, nh, QUERY_TILE), dtype=torch.float32, device=q.device)
    acc = torch.zeros((T, nh, QUERY_TILE, hs), dtype=torch.float32, device=q.device)
    scale = 1 / math.sqrt(hs)
    for first in range(0, plan.key_slots.shape[1], KEY_TILE):
        slots = plan.key_slots[:, first:first + KEY_TILE]
        keys = k_flat[slots].permute(0, 2, 3, 1)  # (T, nh, hs, KEY_TILE)
        values = v_flat[slots].transpose(1, 2)  # (T, nh, KEY_TILE, hs)
        scores = torch.matmul(queries, keys).float() * scale  # (T, nh, QUERY_TILE, KEY_TILE)
        visible = torch.arange(first, first + KEY_TILE, device=q.device) <= plan.positions[:, :, None]
        scores = scores.masked_fill(~visible[:, None], -math.inf)
        new_best = torch.maximum(best, scores.amax(-1))
        rescale = torch.exp(best - new_best)
        weights = torch.exp(scores - new_best[..., None])
        total = total * rescale + weights.sum(-1)
        acc = acc * rescale[..., None] + torch.matmul(weights.to(values.dtype), values).float()
        best = new_best
    tiles = (acc / total[..., None]).to(q.dtype).transpose(1, 2)  # (T, QUERY_TILE, nh, hs)
    out = torch.empty_like(q)
    out[plan.rows[plan.real]] = tiles[plan.real]
    return out
