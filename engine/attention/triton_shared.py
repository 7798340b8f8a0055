"""Shared-prefix (cascade) attention in Triton: decodes whose sequences begin with the same cached blocks attend
to that prefix together.

With prefix caching, many sequences can hold the same blocks (a system prompt before every request). The decode
kernel reads a sequence's whole context once per sequence, so a 600-token prefix shared by 256 decodes is read 256
times a step. Here the prefix is read once per tile of BLOCK_M decodes: their queries form one (BLOCK_M, hs) tile
per head that attends to the prefix's keys with tl.dot, as a prefill tile would, since every key of the prefix lies
before every decode's position (no causal mask). Each (tile, head, split) writes a partial output and its
log-sum-exp into the decode kernel's partial buffers, after the decode kernel's own partitions, which cover the
rest of each context; its combine kernel then merges them all (FlashInfer's cascade inference).

The prefix is `shared_len[0]` tokens at the start of `shared_table`'s blocks; decode s takes part when
`shared_lens[s]` > 0 (then it equals shared_len[0]), else its partials here are neutral (output 0, log-sum-exp
-inf). Lengths are read on the device, so a call can be captured in a CUDA graph and replayed with a new prefix.
"""
import torch
import triton
import triton.language as tl

from engine.pdl import enabled as pdl_enabled, wait_for_inputs

from engine.attention.metadata import SHARED_SPLIT_TOKENS
from engine.attention.triton_prefill import _attend

BLOCK_M = 64  # decodes per tile
BLOCK_N = 64  # prefix tokens per key tile
LOG2E = 1.4426950408889634


@triton.jit
def _shared_prefix_kernel(q_ptr, k_cache_ptr, v_cache_ptr, shared_table_ptr, shared_len_ptr, shared_lens_ptr,
                          part_out_ptr, part_lse_ptr, num_rows, first_part, parts_per_row, qk_scale,
                          stride_qd, stride_qh, stride_kb, stride_kt, stride_kh,
                          BLOCK_SIZE: tl.constexpr, HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          SPLIT_TOKENS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    m_block, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    shared_len = tl.load(shared_len_ptr)
    start = split * SPLIT_TOKENS
    end = tl.minimum(start + SPLIT_TOKENS, shared_len)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < num_rows
    member = tl.load(shared_lens_ptr + offs_m, mask=mask_m, other=0) > 0
    offs_d = tl.arange(0, HS)
    q = tl.load(q_ptr + offs_m[:, None] * stride_qd + head * stride_qh + offs_d[None, :],
                mask=(mask_m & member)[:, None], other=0.0)  # (BLOCK_M, HS)
    k_ptr = k_cache_ptr + head * stride_kh
    v_ptr = v_cache_ptr + head * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HS], dtype=tl.float32)
    # the prefill kernel's loop; as if every decode sat at the partition's last key, which masks the keys of a
    # last tile past it
    last = tl.zeros([BLOCK_M], dtype=tl.int32) + (end - 1)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, last, k_ptr, v_ptr, shared_table_ptr, stride_kb, stride_kt, qk_scale,
                            start, end, BLOCK_SIZE, HS, BLOCK_N, True, PRECISION)

    # a partition past the prefix, or a decode outside it, is neutral: output 0, log-sum-exp -inf
    keep = member & (l_i > 0)
    l_safe = tl.where(keep, l_i, 1.0)
    part = (offs_m * tl.num_programs(1) + head) * parts_per_row + first_part + split  # (BLOCK_M,)
    tl.store(part_out_ptr + part[:, None] * HS + offs_d[None, :], tl.where(keep[:, None], acc / l_safe[:, None], 0.0),
             mask=mask_m[:, None])
    tl.store(part_lse_ptr + part, tl.where(keep, m_i + tl.log2(l_safe), float("-inf")), mask=mask_m)


def shared_prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            shared_table: torch.Tensor, shared_len: torch.Tensor, shared_lens: torch.Tensor,
                            part_out: torch.Tensor, part_lse: torch.Tensor, first_part: int, splits: int,
                            scale: float) -> None:
    """The partials of decodes q (D, nh, hs) over the shared prefix: shared_table (W,) its blocks, shared_len (1,)
    its tokens (at most splits * SHARED_SPLIT_TOKENS), shared_lens (D,) > 0 for the decodes that take part. Writes
    partitions first_part .. first_part + splits - 1 of part_out (D, nh, parts, hs) and part_lse (D, nh, parts),
    both fp32."""
    D, nh, hs = q.shape
    assert q.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.is_contiguous()
    assert part_out.is_contiguous() and part_lse.is_contiguous() and first_part + splits <= part_lse.shape[2]
    pdl = pdl_enabled(q.device)
    _shared_prefix_kernel[(triton.cdiv(D, BLOCK_M), nh, splits)](
        q, k_cache, v_cache, shared_table, shared_len, shared_lens, part_out, part_lse, D, first_part,
        part_lse.shape[2], scale * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], HS=hs, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPLIT_TOKENS=SHARED_SPLIT_TOKENS,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PDL=pdl, num_warps=4, num_stages=2,
        launch_pdl=pdl)
