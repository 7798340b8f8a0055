"""Sweep the decode kernel's tile (BLOCK_N), warps and split target on gpt2-medium's heads (GPU only): the four
fastest settings per batch size, and the time of the current one. With --splits: the time of each partition
count per batch size and context, each call replayed in a CUDA graph as the engine runs it."""
import argparse
import math

import torch
from triton.testing import do_bench, do_bench_cudagraph

from engine.attention import triton_decode

NH, HS, BLOCK_SIZE, NUM_BLOCKS, WIDTH = 16, 64, 16, 16384, 64


def sweep_splits(k: torch.Tensor, v: torch.Tensor) -> None:
    """Microseconds of a decode call (the split kernel and its merge) with 1, 2, 4 and 8 partitions and with the
    engine's choice (*), at contexts shorter than the longest the tables allow."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for ctx in (128, 512, 1000):
        for batch in (1, 2, 4, 8, 16, 24, 32, 64):
            tables = torch.randperm(NUM_BLOCKS, device="cuda")[:batch * WIDTH].view(batch, WIDTH).int()
            lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            q = torch.randn(batch, NH, HS, device="cuda", dtype=torch.bfloat16)
            out = torch.empty_like(q)
            chosen = triton_decode.choose_num_splits(batch, NH, WIDTH * BLOCK_SIZE, sms)
            row = []
            for splits in sorted({chosen, 1, 2, 4, 8}):
                ms = do_bench_cudagraph(lambda: triton_decode.paged_decode_attention(
                    q, k, v, tables, lens, out, 1 / math.sqrt(HS), splits), rep=50)
                row.append(f"s{splits}{'*' if splits == chosen else ''}={ms * 1e3:.1f}us")
            print(f"ctx {ctx} batch {batch}: " + " ".join(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", action="store_true", help="sweep the partition count instead")
    args = p.parse_args()
    torch.manual_seed(0)
    k = torch.randn(NUM_BLOCKS, BLOCK_SIZE, NH, HS, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if args.splits:
        sweep_splits(k, v)
        return
    current = (triton_decode.BLOCK_N, triton_decode.NUM_WARPS, triton_decode.PROGRAMS_PER_SM)
    for batch, ctx in ((1, 512), (32, 512), (128, 512), (256, 512)):
        tables = torch.randperm(NUM_BLOCKS, device="cuda")[:batch * WIDTH].view(batch, WIDTH).int()
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, NH, HS, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        timings = []
        for setting in [(n, w, p) for n in (32, 64, 128) for w in (2, 4, 8) for p in (2, 4, 8)]:
            triton_decode.BLOCK_N, triton_decode.NUM_WARPS, triton_decode.PROGRAMS_PER_SM = setting
            ms = do_bench(lambda: triton_decode.paged_decode_attention(q, k, v, tables, lens, out, 1 / math.sqrt(HS)),
                          return_mode="median")
            timings.append((ms, setting))
        timings.sort()
        kv_bytes = batch * ctx * NH * HS * 2 * 2
        best = [f"{ms * 1e3:.1f}us bn{n} w{w} pps{p} {kv_bytes / ms / 1e6:.0f}GB/s" for ms, (n, w, p) in timings[:4]]
        print(batch, ctx, best, "current:", [f"{ms * 1e3:.1f}" for ms, s in timings if s == current], flush=True)
    triton_decode.BLOCK_N, triton_decode.NUM_WARPS, triton_decode.PROGRAMS_PER_SM = current


if __name__ == "__main__":
    main()
