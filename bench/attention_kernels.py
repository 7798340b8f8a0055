"""Microbenchmark of the Triton paged attention kernels on gpt2-medium's attention shape (GPU only).

For each decode batch and prefill batch: the error against a float32 reference, the kernel's median time (decode
also replayed from a CUDA graph, and without the context split), the time of the PyTorch path it replaces (gather
K/V through the block tables, then SDPA with a mask), and what the kernel achieves: decode in GB/s of K/V read
against the device's copy bandwidth, prefill in TFLOP/s of causal attention.

    python -m bench.attention_kernels --out DIR    # prints a table, writes DIR/attention_kernels.json
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from engine.attention.triton_decode import choose_num_splits, paged_decode_attention
from engine.attention.metadata import block_m_for, prefill_work
from engine.attention.triton_prefill import paged_prefill_attention

NH, HS, BLOCK_SIZE, DTYPE = 16, 64, 16, torch.bfloat16  # gpt2-medium's heads, bf16, production blocks
NUM_BLOCKS = 16384  # 262k tokens, 512 MiB per cache: far past L2, and tables draw from it shuffled
DECODE = [(1, 512), (8, 512), (32, 512), (128, 512), (256, 512), (8, 1024)]  # (batch, context)
PREFILL = [  # (name, chunk lengths, context lengths)
    ("4 x 512", [512] * 4, [512] * 4),
    ("16 x 128", [128] * 16, [128] * 16),
    ("1 x 1024", [1024], [1024]),
    ("256 after 512", [256], [768]),
]
SCALE = 1 / math.sqrt(HS)
DEVICE = "cuda"


def median_ms(fn) -> float:
    return do_bench(fn, return_mode="median")  # flushes L2 before every run: K/V come from HBM


def graph_of(fn) -> torch.cuda.CUDAGraph:
    fn()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write) on 512 MiB."""
    x = torch.empty(1 << 28, dtype=DTYPE, device=DEVICE)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / median_ms(lambda: y.copy_(x)) / 1e6


def block_tables(num_seqs: int, max_context: int) -> torch.Tensor:
    """Distinct random blocks for every sequence, as a long-running server's pool hands them out."""
    W = triton.cdiv(max_context, BLOCK_SIZE)
    return torch.randperm(NUM_BLOCKS, device=DEVICE)[:num_seqs * W].view(num_seqs, W).to(torch.int32)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def sdpa_decode(q, k_cache, v_cache, tables, context_lens, dtype=DTYPE) -> torch.Tensor:
    """The PyTorch path: every sequence's K/V padded to W blocks, SDPA with a mask past its context."""
    D, W = tables.shape
    k = k_cache[tables.long()].view(D, W * BLOCK_SIZE, NH, HS).transpose(1, 2).to(dtype)  # (D, nh, T, hs)
    v = v_cache[tables.long()].view(D, W * BLOCK_SIZE, NH, HS).transpose(1, 2).to(dtype)
    mask = torch.arange(W * BLOCK_SIZE, device=q.device) < context_lens[:, None]  # (D, T)
    return F.scaled_dot_product_attention(q.unsqueeze(2).to(dtype), k, v, attn_mask=mask[:, None, None]).squeeze(2)


def sdpa_prefill(q, k_cache, v_cache, tables, query_lens, context_lens, dtype=DTYPE) -> torch.Tensor:
    """The PyTorch path: per sequence, gather its context by slot and run SDPA with a causal mask that ends at the
    chunk's last position (the chunk may follow earlier context)."""
    outs, row = [], 0
    for s, (n, ctx) in enumerate(zip(query_lens, context_lens)):
        pos = torch.arange(ctx, device=q.device)
        slots = tables[s, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        k = k_cache.view(-1, NH, HS)[slots].transpose(0, 1).to(dtype)  # (nh, ctx, hs)
        v = v_cache.view(-1, NH, HS)[slots].transpose(0, 1).to(dtype)
        mask = pos[None, :] <= pos[ctx - n:, None]  # (n, ctx)
        y = F.scaled_dot_product_attention(q[row:row + n].transpose(0, 1).to(dtype), k, v, attn_mask=mask)
        outs.append(y.transpose(0, 1))
        row += n
    return torch.cat(outs)


def bench_decode(k_cache, v_cache, batch: int, context: int, sm_count: int, copy: float) -> dict:
    tables = block_tables(batch, context)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, NH, HS, dtype=DTYPE, device=DEVICE)
    out = torch.empty_like(q)
    run = lambda splits=None: paged_decode_attention(q, k_cache, v_cache, tables, lens, out, SCALE, splits)
    run()
    err = rel_error(out, sdpa_decode(q, k_cache, v_cache, tables, lens, torch.float32))
    graph = graph_of(run)
    t = median_ms(run)
    kv_bytes = 2 * batch * context * NH * HS * k_cache.element_size()
    return dict(batch=batch, context=context, num_splits=choose_num_splits(batch, NH, context, sm_count),
                rel_error=err, triton_us=1e3 * t, graph_us=1e3 * median_ms(graph.replay),
                no_split_us=1e3 * median_ms(lambda: run(1)),
                sdpa_us=1e3 * median_ms(lambda: sdpa_decode(q, k_cache, v_cache, tables, lens)),
                gbps=kv_bytes / t / 1e6, copy_fraction=kv_bytes / t / 1e6 / copy)


def bench_prefill(k_cache, v_cache, name: str, query_lens: list[int], context_lens: list[int]) -> dict:
    tables = block_tables(len(query_lens), max(context_lens))
    q = torch.randn(sum(query_lens), NH, HS, dtype=DTYPE, device=DEVICE)
    starts = torch.tensor([0] + query_lens, device=DEVICE).cumsum(0).to(torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    block_m = block_m_for(max(query_lens))
    work = torch.from_numpy(prefill_work(query_lens, context_lens, block_m)).to(DEVICE)
    run = lambda: paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, work, block_m, out, SCALE)
    run()
    err = rel_error(out, sdpa_prefill(q, k_cache, v_cache, tables, query_lens, context_lens, torch.float32))
    t = median_ms(run)
    # causal work actually needed: a query at position p meets p + 1 keys, 2 flops per q.k and per p.v element
    pairs = sum(n * ctx - n * (n - 1) // 2 for n, ctx in zip(query_lens, context_lens))
    return dict(name=name, tokens=sum(query_lens), rel_error=err, triton_us=1e3 * t,
                sdpa_us=1e3 * median_ms(lambda: sdpa_prefill(q, k_cache, v_cache, tables, query_lens, context_lens)),
                tflops=4 * pairs * NH * HS / t / 1e9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for attention_kernels.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.attention_kernels times Triton kernels on a CUDA GPU, and there is none here")
    torch.manual_seed(0)
    k_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, NH, HS, dtype=DTYPE, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_gbps()
    decode = [bench_decode(k_cache, v_cache, b, c, sm_count, copy) for b, c in DECODE]
    prefill = [bench_prefill(k_cache, v_cache, *case) for case in PREFILL]

    name = torch.cuda.get_device_name()
    print(f"{name}: nh={NH} hs={HS} {str(DTYPE)[6:]} block_size={BLOCK_SIZE}, copy {copy:.0f} GB/s")
    print(f"\n{'decode':>13} {'splits':>6} {'rel err':>8} {'triton us':>9} {'graph us':>8} {'1 split':>8} "
          f"{'sdpa us':>8} {'GB/s':>6} {'of copy':>7} {'speedup':>7}")
    for r in decode:
        print(f"{r['batch']:>5} x {r['context']:>5} {r['num_splits']:>6} {r['rel_error']:>8.1e} {r['triton_us']:>9.1f} "
              f"{r['graph_us']:>8.1f} {r['no_split_us']:>8.1f} {r['sdpa_us']:>8.1f} {r['gbps']:>6.0f} "
              f"{r['copy_fraction']:>7.0%} {r['sdpa_us'] / r['triton_us']:>6.1f}x")
    print(f"\n{'prefill':>13} {'tokens':>6} {'rel err':>8} {'triton us':>9} {'sdpa us':>8} {'TFLOP/s':>7} {'speedup':>7}")
    for r in prefill:
        print(f"{r['name']:>13} {r['tokens']:>6} {r['rel_error']:>8.1e} {r['triton_us']:>9.1f} {r['sdpa_us']:>8.1f} "
              f"{r['tflops']:>7.1f} {r['sdpa_us'] / r['triton_us']:>6.1f}x")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention_kernels.json")
    with open(path, "w") as f:
        json.dump(dict(benchmark="attention_kernels", device=name, torch=torch.__version__, triton=triton.__version__,
                       shape=dict(nh=NH, hs=HS, dtype=str(DTYPE), block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
                       sm_count=sm_count, copy_gbps=copy, decode=decode, prefill=prefill), f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
