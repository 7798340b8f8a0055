"""Paged varlen prefill attention in Triton: packed chunks of new tokens attend causally to their own sequences.

This file owns prefill attention; one-token decodes are triton_decode.py's (though a one-token chunk works here
too). The queries of S sequences are packed without padding: sequence s owns rows query_start[s] to
query_start[s+1]-1, and they are the last tokens of its context of context_lens[s] tokens, so a chunk may follow
earlier cached context (chunked prefill). Keys and values are read from the paged cache through the block tables:
k_cache and v_cache are (num_blocks, block_size, nh, hs) and the step's own K/V are already there.

Flash-attention tiling: a program takes BLOCK_M queries of one sequence and head, streams BLOCK_N keys at a time
with tl.dot and an online softmax in fp32, masks only the tiles on the causal diagonal, and skips those above it.
Which query tile a program takes comes from a work list built on the host (metadata.prefill_work): one entry per
(sequence, query tile), longest-context tiles first so the short ones fill the tail, padded with -1 entries to a
fixed length when the call is captured in a CUDA graph.
"""
import torch
import triton
import triton.language as tl

from engine.pdl import enabled as pdl_enabled, wait_for_inputs

BLOCK_N = 64  # keys per tile, gathered from several cache blocks through the block table
LOG2E = 1.4426950408889634  # softmax in base 2: exp2 is one instruction


@triton.jit
def _attend(acc, l_i, m_i, q, pos_m, k_ptr, v_ptr, table, stride_kb, stride_kt, qk_scale, lo, hi,
            BLOCK_SIZE: tl.constexpr, HS: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
            PRECISION: tl.constexpr):
    """Fold keys lo..hi-1 into the online softmax of the query tile. CAUSAL masks keys past each query; without
    it lo..hi must be whole tiles below the diagonal, as the scores of keys past hi are not masked."""
    offs_d = tl.arange(0, HS)
    for tile in range(lo, hi, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        mask_n = offs_n < hi
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)  # int64: caches > 2^31
        kv_offs = block[:, None] * stride_kb + (offs_n % BLOCK_SIZE)[:, None] * stride_kt + offs_d[None, :]
        k = tl.load(k_ptr + kv_offs, mask=mask_n[:, None], other=0.0)  # (BLOCK_N, HS)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if CAUSAL:  # keys past hi (loaded as 0) lie past every real query's position: masked too
            visible = offs_n[None, :] <= pos_m[:, None]
        else:
            visible = mask_n[None, :]
        # a select in every tile, masked or not: without it the compiler fuses the scaling into exp2's subtraction
        # (an FMA) in unmasked tiles only, and a score's bits would depend on whether its key tile lies on the
        # diagonal of the query's tile, which moves with where a chunk starts (BATCH_INVARIANT needs them fixed)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the first tile holds key 0 or the diagonal
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(v_ptr + kv_offs, mask=mask_n[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, context_lens_ptr, work_ptr,
                    out_ptr, qk_scale, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot,
                    stride_oh, BLOCK_SIZE: tl.constexpr, HS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    seq = tl.load(work_ptr + 2 * tl.program_id(0))
    if seq < 0:  # padding of a captured step's work list
        return
    m_block = tl.load(work_ptr + 2 * tl.program_id(0) + 1)
    head = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows within the chunk
    mask_m = offs_m < q_len
    pos_m = context_len - q_len + offs_m  # their cache positions: the chunk is the context's end
    first_pos = context_len - q_len + m_block * BLOCK_M
    offs_d = tl.arange(0, HS)
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)  # (BLOCK_M, HS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HS], dtype=tl.float32)
    k_ptr = k_cache_ptr + head * stride_kh
    v_ptr = v_cache_ptr + head * stride_kh
    table = block_tables_ptr + seq * stride_bt
    # keys before the diagonal tiles are visible to every query of the tile: no causal mask
    diag = first_pos // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, pos_m, k_ptr, v_ptr, table, stride_kb, stride_kt, qk_scale, 0, diag,
                            BLOCK_SIZE, HS, BLOCK_N, False, PRECISION)
    # the diagonal tiles, up to the tile's last real query; keys above it are never loaded
    hi = tl.minimum(first_pos + BLOCK_M, context_len)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, pos_m, k_ptr, v_ptr, table, stride_kb, stride_kt, qk_scale, diag, hi,
                            BLOCK_SIZE, HS, BLOCK_N, True, PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start: torch.Tensor, context_lens: torch.Tensor, work: torch.Tensor, block_m: int,
                            out: torch.Tensor, scale: float) -> None:
    """Causal attention of packed query chunks over their sequences' cached context.
    q, out: (P, nh, hs); k_cache, v_cache: (num_blocks, block_size, nh, hs); block_tables: (S, W) int32 or int64;
    query_start: (S+1,) row offsets; context_lens: (S,), each >= its chunk's length; work: (items, 2) from
    metadata.prefill_work with the same block_m. Writes into out (which may be a strided view)."""
    nh, hs = q.shape[1:]
    assert q.stride(-1) == out.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.is_contiguous()
    pdl = pdl_enabled(q.device)
    _prefill_kernel[(len(work), nh)](
        q, k_cache, v_cache, block_tables, query_start, context_lens, work, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=k_cache.shape[1], HS=hs, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact; halves ignore it
        PDL=pdl, num_warps=4, num_stages=2, launch_pdl=pdl)
