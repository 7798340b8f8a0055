"""Writing a step's new K and V into the paged cache in one Triton launch (two index_copy_ calls otherwise).

Token t's K/V go to flat slot slot_mapping[t] of k_cache and v_cache, (num_blocks, block_size, nh, hs) viewed as
(slots, nh * hs). One program per token copies its K and V rows; k and v may be strided views (the columns of
the fused QKV projection)."""
import torch
import triton
import triton.language as tl

from engine.pdl import enabled as pdl_enabled, wait_for_inputs


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_k, stride_v,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < WIDTH
    tl.store(k_cache_ptr + slot * WIDTH + offs, tl.load(k_ptr + t * stride_k + offs, mask=mask), mask=mask)
    tl.store(v_cache_ptr + slot * WIDTH + offs, tl.load(v_ptr + t * stride_v + offs, mask=mask), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: (N, nh, hs), each row contiguous; caches: (num_blocks, block_size, nh, hs) contiguous."""
    N, nh, hs = k.shape
    assert k.stride(1) == v.stride(1) == hs and k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous()
    width, pdl = nh * hs, pdl_enabled(k.device)
    _write_kv_kernel[(N,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                           WIDTH=width, BLOCK=triton.next_power_of_2(width), PDL=pdl, num_warps=4, launch_pdl=pdl)
