"""The batch-invariant product of the GPU path (BATCH_INVARIANT): x @ Wᵀ + b with one fixed tiling whatever the
number of rows of x.

cuBLAS picks a kernel by the product's shape (its tiles, and whether to split the reduction over K across
programs), so a row of a step's product changes in its last bits with how many rows the step has. Here every
output tile is one program's, which reduces over K in BLOCK_K steps from 0 with tl.dot into an fp32 accumulator,
the same tiles in the same order for every shape: a row's numbers depend on that row and the weights only. The
bias is added to the fp32 sum, as cuBLAS's epilogue adds it. On a CPU it runs under TRITON_INTERPRET=1 (tests).
"""
import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64  # fixed: the reduction's order must not follow the shape


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = k + offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k + offs_k)[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k + offs_k)[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (M, K) and weight (N, K), each row's result independent of M."""
    M, K = x.shape
    N = weight.shape[0]
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _linear_kernel[grid](x, weight, bias if bias is not None else x, out, M, N, K, x.stride(0), weight.stride(0),
                         out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                         BLOCK_K=BLOCK_K, PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return out
