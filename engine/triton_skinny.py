"""Products of a few rows (a decode step's) in Triton: x @ Wᵀ + b, optionally with GPT-2's tanh GELU, read at
the weights' bandwidth.

A decode step of gpt2-medium multiplies at most a few hundred rows by each weight matrix: the product is a read
of the weights (2-8 MB each) and little arithmetic. cuBLAS's kernels for these shapes leave most of the H100's
bandwidth unused (the four products of a layer took 6-7 us each at batch 128, ~1 TB/s; at batch 1 4-6 us and a
separate split-K reduction kernel). Here each program takes every row (BLOCK_M >= M) and a BLOCK_N slice of
the outputs over a 1/SPLIT_K share of K, so that enough programs stream the weights at once; the split-K partials
are summed by whichever program of an output slice finishes last (a ticket counter per slice, reset by that
program for the next launch), which then adds the bias and the GELU: one launch per product, CUDA graph safe.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from model import cublaslt_gelu_product

MAX_ROWS = 256  # beyond this, cuBLAS's tiles are the better product


@triton.jit
def _gelu_tanh(x):
    # GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(u) = 2 sigmoid(2u) - 1
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, tickets_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SPLIT_K: tl.constexpr, K_SHARE: tl.constexpr,
                   BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(pid_k * K_SHARE, (pid_k + 1) * K_SHARE, BLOCK_K):  # K_SHARE: whole tiles, masked past K
        mask_k = k + offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k + offs_k)[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k + offs_k)[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    mask_out = mask_m[:, None] & mask_n[None, :]
    store_mask = mask_out
    if SPLIT_K > 1:
        # partials at [split, row, column]; the slice's last program to take a ticket sums them (the ticket's
        # acquire-release ordering makes the other programs' partials visible to it)
        part = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask_out)
        ticket = tl.atomic_add(tickets_ptr + pid_n, 1, sem="acq_rel")
        last = ticket == SPLIT_K - 1
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(SPLIT_K):
            acc += tl.load(part + s * M * N, mask=mask_out & last, other=0.0, cache_modifier=".cg")
        tl.store(tickets_ptr + pid_n, 0, mask=last)  # ready for the next launch (or graph replay)
        store_mask = mask_out & last
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_tanh(acc)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=store_mask)


MAX_SLICES = 1024


@functools.cache
def _tickets(device: torch.device) -> torch.Tensor:
    """One zeroed ticket counter per output slice, kept for every later launch (each leaves them at zero)."""
    return torch.zeros(MAX_SLICES, dtype=torch.int32, device=device)


def config(M: int, N: int, K: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps) for an (M, K) x (K, N) product: enough programs to keep ~2 per SM
    reading weights, each reading a few tiles in a row."""
    block_n = 32 if M <= 64 else 64
    slices = triton.cdiv(N, block_n)
    split_k = max(1, min(8, 256 // slices, K // 256))
    return block_n, 128 if M <= 64 else 64, split_k, 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False,
           cfg: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) (then GPT-2's tanh GELU if `gelu`) for x (M, K) with M <= MAX_ROWS, weight
    (N, K)."""
    M, K = x.shape
    N = weight.shape[0]
    assert M <= MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1
    block_n, block_k, split_k, warps = cfg or config(M, N, K)
    slices = triton.cdiv(N, block_n)
    assert slices <= MAX_SLICES
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if split_k > 1 else out
    _skinny_kernel[(slices, split_k)](
        x, weight, bias if bias is not None else x, out, part, _tickets(x.device), M, N, K,
        x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, GELU=gelu, SPLIT_K=split_k,
        K_SHARE=triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k,
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=3)
    return out


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this kernel takes the product: a few rows, and an output that its ticket counters cover (the vocab
    projection's 50,304 columns go to cuBLAS)."""
    return x.shape[0] <= MAX_ROWS and triton.cdiv(weight.shape[0], config(x.shape[0], *weight.shape)[0]) <= MAX_SLICES


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The GPU path's product (GPT.use_product): this kernel for a decode's few rows, cuBLAS for the rest. The
    row count is fixed for a captured graph, so the choice is made once per graph."""
    return linear(x, weight, bias) if fits(x, weight) else F.linear(x, weight, bias)


def gelu_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """c_fc's product and GELU (MLP.gelu_product): this kernel for a few rows, cuBLASLt's epilogue for the rest."""
    return linear(x, weight, bias, gelu=True) if fits(x, weight) else cublaslt_gelu_product(x, weight, bias)
