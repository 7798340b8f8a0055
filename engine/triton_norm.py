"""The residual add and the layer norm after it in one Triton launch instead of two, on the GPU path
(GPT.fuse_kernels): a decode step at batch 1 is launch-bound, and each layer has two such pairs.

One program per row: it adds the sublayer's output y to the residual stream x, writes the sum (the new stream),
and normalises that sum with the next norm's weight and bias. The sum is rounded to the stream's dtype before it
is normalised, and the statistics are taken in fp32, as `x + y` then F.layer_norm compute it.
"""
import torch
import triton
import triton.language as tl

from engine.pdl import enabled as pdl_enabled, wait_for_inputs


@triton.jit
def _add_layer_norm_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, sum_ptr, norm_ptr, eps,
                           C: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0) * C
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    total = (x + y).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row + offs, total, mask=mask)
    total = total.to(tl.float32)  # the stream as stored: what the unfused norm would read
    mean = tl.sum(total, axis=0) / C
    centred = tl.where(mask, total - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / C + eps)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(norm_ptr + row + offs, (centred * rstd * weight + bias).to(norm_ptr.dtype.element_ty), mask=mask)


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x + y and F.layer_norm(x + y, (C,), weight, bias, eps). x, y: (N, C) contiguous, one dtype."""
    N, C = x.shape
    assert x.is_contiguous() and y.is_contiguous() and y.shape == x.shape and y.dtype == x.dtype
    total, norm = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(C)
    # a row is a few KB: one warp per 256 columns keeps each thread on a handful of them (Triton's tutorial's rule)
    pdl = pdl_enabled(x.device)
    _add_layer_norm_kernel[(N,)](x, y, weight, bias, total, norm, eps, C=C, BLOCK=block, PDL=pdl,
                                 num_warps=min(max(block // 256, 1), 8), launch_pdl=pdl)
    return total, norm
