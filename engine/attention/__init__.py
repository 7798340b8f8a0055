"""Paged attention for the model's layers: in plain PyTorch, the reference (the CPU path, and the oracle) or the
batch-invariant one (BATCH_INVARIANT), or the Triton kernels (the GPU path; on a CPU they run under
TRITON_INTERPRET=1, for tests). The runner picks one per step by building the metadata with or without a plan
of the PyTorch ones."""
import functools
import math

import torch

from engine.attention.metadata import AttentionMetadata


@functools.cache
def _kernels():
    from engine.attention import triton_cache, triton_decode, triton_prefill  # triton only on this path
    return triton_cache.write_kv, triton_decode.paged_decode_attention, triton_prefill.paged_prefill_attention


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """The one write path into the cache, for prefill and decode: token t's K/V to slot meta.slot_mapping[t]."""
    if meta.reference is not None:
        nh, hs = k.shape[1:]
        k_cache.view(-1, nh, hs).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, nh, hs).index_copy_(0, meta.slot_mapping, v)
    else:
        _kernels()[0](k, v, k_cache, v_cache, meta.slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """q: (N, nh, hs), new tokens packed decodes first; caches: (num_blocks, block_size, nh, hs), this step's
    K/V already written. Returns (N, nh, hs)."""
    if meta.reference is not None:
        return meta.reference.attend(q, k_cache, v_cache, meta)
    _, decode, prefill = _kernels()
    out = torch.empty_like(q)
    D, scale = meta.num_decodes, 1 / math.sqrt(q.shape[-1])
    if D:
        decode(q[:D], k_cache, v_cache, meta.block_tables[:D], meta.context_lens[:D], out[:D], scale,
               shared=meta.shared)
    if D < len(q):
        prefill(q[D:], k_cache, v_cache, meta.block_tables[D:], meta.query_start, meta.context_lens[D:],
                meta.prefill_work, meta.block_m, out[D:], scale)
    return out
