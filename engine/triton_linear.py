"""The GPU path's own products in Triton, x @ Wᵀ + b (optionally then GPT-2's tanh GELU), in two tilings of one
kernel: BATCH_INVARIANT's, whose every row is the same arithmetic whatever the number of rows, and the default
path's for a step of a few rows, which reads the weights with many programs at once.

The kernel: a program takes BLOCK_M rows and BLOCK_N outputs over a 1/SPLIT_K share of K, reducing in BLOCK_K
steps with tl.dot into an fp32 accumulator. With SPLIT_K > 1 each program writes its partial sum, and whichever
program of an output tile takes the last ticket (a counter per tile, reset by that program for the next launch)
sums the partials in split order; the bias and the GELU follow the sum. One launch per product, CUDA graph safe.

- `invariant_linear` / `invariant_gelu_product` (BATCH_INVARIANT): cuBLAS picks its kernel by the product's shape
  (its tiles, whether to split the reduction over K), so a row of a step's product changes in its last bits with
  how many rows the step has. Here K is reduced the same way for every row count (64-wide steps from 0, in order,
  split or not by K alone), so a row's numbers depend on that row and the weights only; the tile around it (which
  rows and columns share a program) grows with the rows, from 16 x 64 up to 64 rows to 128 x 128 past 512: on an
  H100 every tile gave a row the same bits, mma.sync and wgmma alike (tests/test_batch_invariant_gpu.py checks
  rows across the limits).
- `product` / `gelu_product` (the GPU path's products, GPT.use_product): a decode step of a few rows multiplies
  them by each weight matrix, a read of 2-8 MB of weights with little arithmetic, where cuBLAS's kernels take 4-6
  us each and a second kernel to sum a split K. Here every row goes in one tile, and the outputs and K are split
  so that ~2 programs per SM stream the weights, summed in the same launch. Up to MAX_ROWS rows; cuBLAS past it
  and for the vocab projection.
On a CPU the kernel runs under TRITON_INTERPRET=1 (tests).
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.pdl import enabled as pdl_enabled, prefetch_l2, wait_for_inputs
from model import cublaslt_gelu_product

# BATCH_INVARIANT's tiles (BLOCK_M, BLOCK_N, warps) by the most rows each takes (the best of those timed on an
# H100, bench/results/h100/cascade-invariant). K goes in 64-wide steps, split in two where it is long (the MLP's
# down projection, whose 1,024 outputs leave most SMs idle at a few rows): by K alone, the same for any M.
INVARIANT_TILES = ((64, (16, 64, 4)), (512, (64, 64, 4)), (None, (128, 128, 8)))
INVARIANT_SPLIT_FROM_K = 4096
# the few-rows tiling's limit: on an H100 it made a decode step 4% shorter at batch 1 and 8, and longer from 32 rows
# up, where cuBLAS's tiles are the better product (bench/results/h100/cascade-invariant)
MAX_ROWS = 16
MAX_TILES = 1024  # output tiles with a ticket counter (the vocab projection's 50,304 columns go to cuBLAS)


@triton.jit
def _gelu_tanh(x):
    # GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(u) = 2 sigmoid(2u) - 1
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, tickets_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SPLIT_K: tl.constexpr, K_SHARE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                   PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if PREFETCH_LINES > 0:  # this program's share of the weights (LINE elements a line), while the kernel before runs
        lines = tl.minimum(pid_k * K_SHARE + tl.arange(0, PREFETCH_LINES) * LINE, K - 1)
        prefetch_l2(w_ptr + tl.minimum(offs_n, N - 1)[:, None] * stride_wn + lines[None, :])
    wait_for_inputs(PDL)
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
        # partials at [split, row, column]; the tile's last program to take a ticket sums them (the ticket's
        # acquire-release ordering makes the other programs' partials visible to it)
        part = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask_out)
        tile = pid_m * tl.num_programs(1) + pid_n
        ticket = tl.atomic_add(tickets_ptr + tile, 1, sem="acq_rel")
        last = ticket == SPLIT_K - 1
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(SPLIT_K):
            acc += tl.load(part + s * M * N, mask=mask_out & last, other=0.0, cache_modifier=".cg")
        tl.store(tickets_ptr + tile, 0, mask=last)  # ready for the next launch (or graph replay)
        store_mask = mask_out & last
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_tanh(acc)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=store_mask)


@functools.cache
def _tickets(device: torch.device) -> torch.Tensor:
    """One zeroed ticket counter per output tile, kept for every later launch (each leaves them at zero)."""
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


def few_rows_config(M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps) for a product of M <= MAX_ROWS rows: every row in one tile (16
    rows, tl.dot's least), 32 outputs a program, and K split so that ~2 programs per SM read weights, each a few
    128-wide steps."""
    assert M <= MAX_ROWS
    return 16, 32, 128, max(1, min(8, 256 // triton.cdiv(N, 32), K // 256)), 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tiling: tuple[int, int, int, int, int],
           gelu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) (then GPT-2's tanh GELU if `gelu`) for x (M, K) and weight (N, K), in `tiling`
    (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps)."""
    M, K = x.shape
    N = weight.shape[0]
    block_m, block_n, block_k, split_k, warps = tiling
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # a split K takes a ticket counter per output tile: a product of more tiles goes in launches of rows that fit
    # (the same tiles: a row's numbers do not change)
    assert split_k == 1 or triton.cdiv(N, block_n) <= MAX_TILES
    rows = max(1, M if split_k == 1 else min(M, MAX_TILES // triton.cdiv(N, block_n) * block_m))
    part = torch.empty(split_k, rows, N, dtype=torch.float32, device=x.device) if split_k > 1 else out
    k_share = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    pdl = pdl_enabled(x.device)
    line = 128 // weight.element_size()
    # the weights are prefetched where one tile of rows reads them (a decode's few rows); more tiles read them anyway
    prefetch_lines = triton.next_power_of_2(triton.cdiv(k_share, line)) if pdl and M <= block_m else 0
    for start in range(0, M, rows):
        m = min(rows, M - start)
        _linear_kernel[(triton.cdiv(m, block_m), triton.cdiv(N, block_n), split_k)](
            x[start:], weight, bias if bias is not None else x, out[start:], part, _tickets(x.device), m, N, K,
            x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, GELU=gelu, SPLIT_K=split_k,
            K_SHARE=k_share, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=pdl, PREFETCH_LINES=prefetch_lines,
            LINE=line, num_warps=warps, num_stages=3, launch_pdl=pdl)
    return out


def invariant_tiling(M: int, K: int) -> tuple[int, int, int, int, int]:
    """BATCH_INVARIANT's tiling of a product of M rows over K."""
    block_m, block_n, warps = next(tile for most, tile in INVARIANT_TILES if most is None or M <= most)
    return block_m, block_n, 64, 2 if K >= INVARIANT_SPLIT_FROM_K else 1, warps


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """BATCH_INVARIANT's product (GPT.use_product): F.linear, each row's result independent of M."""
    return linear(x, weight, bias, invariant_tiling(*x.shape))


def invariant_gelu_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """BATCH_INVARIANT's c_fc product (MLP.gelu_product), then GPT-2's tanh GELU apart. With the GELU in the
    product's epilogue every row of the product matched its row alone on an H100, yet one of the engine's 64 seeded
    requests in a crowd got other tokens than alone; apart, all got theirs. The likelier cause was found later in
    the prefill kernel (a chunk's start changed a score's bits; bench/results/h100/notes.md, seventh session), of
    which this rounding only moved which token showed it; fusing it again waits for a GPU run of the tests that
    compare logprobs."""
    return F.gelu(invariant_linear(x, weight, bias), approximate="tanh")


def few_rows_tiling(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int, int] | None:
    """The few-rows tiling of this product, or None where it does not take it: past MAX_ROWS rows, or more output
    tiles than there are ticket counters."""
    M, (N, K) = x.shape[0], weight.shape
    if M > MAX_ROWS:
        return None
    tiling = few_rows_config(M, N, K)
    return tiling if triton.cdiv(N, tiling[1]) <= MAX_TILES else None


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The GPU path's product (GPT.use_product): the few-rows tiling where it fits, cuBLAS for the rest. A captured
    graph's row count is fixed, so the choice is made once per graph."""
    tiling = few_rows_tiling(x, weight)
    return linear(x, weight, bias, tiling) if tiling else F.linear(x, weight, bias)


def gelu_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """c_fc's product and GELU (MLP.gelu_product): the few-rows tiling, else cuBLASLt's epilogue."""
    tiling = few_rows_tiling(x, weight)
    return linear(x, weight, bias, tiling, gelu=True) if tiling else cublaslt_gelu_product(x, weight, bias)
