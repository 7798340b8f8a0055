"""Paged decode attention in Triton: one new token per sequence attends to its whole cached context.

This file owns decode attention; packed prefill chunks are triton_prefill.py's. The cache is paged: k_cache and
v_cache are (num_blocks, block_size, nh, hs), and a sequence's token at position p lives in block
block_tables[s, p // block_size], row p % block_size. The step's own K/V are already in the cache.

One program per (sequence, head) leaves most SMs idle when the batch is small, so the context can be split into
num_splits partitions (flash-decoding): each program writes a partial output with its log-sum-exp, and a small
second kernel merges them. The launch depends only on host ints (D, nh, W and the GPU's SM count), never on a
value on the device, so a call can be captured in a CUDA graph and replayed with new lengths and tables.

With a shared prefix (triton_shared.py, cascade attention), a decode that takes part starts its own partitions
after the prefix, and the merge takes the prefix's partials too.
"""
import functools

import torch
import triton
import triton.language as tl

from engine.attention.metadata import SharedPrefix
from engine.attention.triton_shared import shared_prefix_attention
from engine.pdl import enabled as pdl_enabled, wait_for_inputs

BLOCK_N = 128  # context tokens per tile, gathered from several cache blocks through the block table
MIN_SPLIT_TOKENS = 128  # a shorter partition costs more to merge than its parallelism saves
PROGRAMS_PER_SM = 2  # split below this many programs per SM: a few warps per SM cannot saturate HBM
NUM_WARPS = 2  # tile and warps swept on an H200 (bench/results/h200/tune_decode.txt): 128 x 2 won at batch 32-256
LOG2E = 1.4426950408889634  # softmax in base 2: exp2 is one instruction


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, starts_ptr, out_ptr,
                   part_out_ptr, part_lse_ptr, qk_scale, split_tokens, parts_per_row,
                   stride_qd, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_od, stride_oh,
                   BLOCK_SIZE: tl.constexpr, HS: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
                   AFTER_PREFIX: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    seq, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, context_len)  # end <= start: a split past the context, no work
    if AFTER_PREFIX:  # the shared prefix's positions are triton_shared.py's
        start = tl.maximum(start, tl.load(starts_ptr + seq).to(tl.int32))

    offs_d = tl.arange(0, HS)
    q = tl.load(q_ptr + seq * stride_qd + head * stride_qh + offs_d).to(tl.float32) * qk_scale  # (HS,)
    table = block_tables_ptr + seq * stride_bt
    m_i = float("-inf")  # running max of the scores (base 2)
    l_i = 0.0  # running sum of exp2(score - m_i)
    acc = tl.zeros([HS], dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)  # (BLOCK_N,) context positions
        mask_n = offs_n < end
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)  # int64: caches > 2^31
        kv_offs = block[:, None] * stride_kb + (offs_n % BLOCK_SIZE)[:, None] * stride_kt + head * stride_kh \
            + offs_d[None, :]  # (BLOCK_N, HS)
        k = tl.load(k_cache_ptr + kv_offs, mask=mask_n[:, None], other=0.0).to(tl.float32)
        s = tl.where(mask_n, tl.sum(q[None, :] * k, axis=1), float("-inf"))  # (BLOCK_N,)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: a tile holds at least one position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(v_cache_ptr + kv_offs, mask=mask_n[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    if PARTIAL:
        # a split with no positions (m_i = -inf, l_i = 0) writes the neutral partial: output 0, log-sum-exp -inf
        part = (seq * tl.num_programs(1) + head) * parts_per_row + split
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        tl.store(part_out_ptr + part * HS + offs_d, acc / l_safe)
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe))
    else:
        out = acc / l_i
        tl.store(out_ptr + seq * stride_od + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_od, stride_oh,
                    HS: tl.constexpr, SPLITS_POW2: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    seq, head = tl.program_id(0), tl.program_id(1)
    first = (seq * tl.num_programs(1) + head) * num_splits
    offs_s = tl.arange(0, SPLITS_POW2)
    mask_s = offs_s < num_splits
    offs_d = tl.arange(0, HS)
    lse = tl.load(part_lse_ptr + first + offs_s, mask=mask_s, other=float("-inf"))  # (SPLITS_POW2,)
    w = tl.exp2(lse - tl.max(lse, axis=0))  # position 0 is in some partition, so the max is finite
    o = tl.load(part_out_ptr + (first + offs_s)[:, None] * HS + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + seq * stride_od + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small pretend GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, nh: int, max_context: int, sm_count: int) -> int:
    """Partitions per sequence: none when the batch alone gives PROGRAMS_PER_SM programs per SM; else the finest,
    MIN_SPLIT_TOKENS each over the longest possible context (W * block_size). A graph's grid is fixed for every
    context it will see, so partitions sized for the longest left a short context on one or two programs; past a
    context a partition costs one tiny store (bench/results/h200/tune_decode_splits.txt). Host ints only: CUDA graph
    safe."""
    if num_seqs * nh >= PROGRAMS_PER_SM * sm_count:
        return 1
    return max(1, max_context // MIN_SPLIT_TOKENS)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, out: torch.Tensor, scale: float,
                           num_splits: int | None = None, shared: SharedPrefix | None = None) -> None:
    """out[s] = softmax(q[s] k^T * scale) v over positions 0..context_lens[s]-1 of sequence s, for every head.
    q, out: (D, nh, hs); k_cache, v_cache: (num_blocks, block_size, nh, hs); block_tables: (D, W) int32 or int64;
    context_lens: (D,) int32 or int64, each >= 1, and longer than shared.lens. Writes into out (which may be a
    strided view)."""
    D, nh, hs = q.shape
    block_size = k_cache.shape[1]
    W = block_tables.shape[1]
    assert q.stride(-1) == out.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.is_contiguous()
    if num_splits is None:
        num_splits = choose_num_splits(D, nh, W * block_size, _sm_count(q.device))
    # partitions of whole tiles, so every tile starts on a BLOCK_N boundary
    split_tokens = triton.cdiv(triton.cdiv(W * block_size, num_splits), BLOCK_N) * BLOCK_N
    parts = num_splits + (shared.splits if shared else 0)
    partial = parts > 1
    part_out = torch.empty((D, nh, parts, hs), dtype=torch.float32, device=q.device) if partial else None
    part_lse = torch.empty((D, nh, parts), dtype=torch.float32, device=q.device) if partial else None
    pdl = pdl_enabled(q.device)
    _decode_kernel[(D, nh, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, shared.lens if shared else context_lens, out, part_out,
        part_lse, scale * LOG2E, split_tokens, parts,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, HS=hs, BLOCK_N=BLOCK_N, PARTIAL=partial, AFTER_PREFIX=shared is not None, PDL=pdl,
        num_warps=NUM_WARPS, num_stages=2, launch_pdl=pdl)
    if shared:
        shared_prefix_attention(q, k_cache, v_cache, shared.table, shared.length, shared.lens, part_out, part_lse,
                                num_splits, shared.splits, scale)
    if partial:
        _combine_kernel[(D, nh)](part_out, part_lse, out, parts, out.stride(0), out.stride(1),
                                 HS=hs, SPLITS_POW2=triton.next_power_of_2(parts), PDL=pdl, num_warps=1,
                                 launch_pdl=pdl)
