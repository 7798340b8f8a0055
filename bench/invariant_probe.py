"""`python -m bench.invariant_probe [--rows 1,16,64,128,512,2048]`: BATCH_INVARIANT's products (gpt2-medium's
four per layer and its vocab projection, bf16) over a sweep of tiles and splits of K, beside cuBLAS and the
engine's own tiling (engine/triton_linear.invariant_tiling), in microseconds per product (20 calls in a CUDA graph,
as bench.skinny_probe times them). The mode needs every row count to reduce K the same way, so a split of K is
chosen per K for all row counts while the tile may change with them: for each split the probe checks that every
tile gives a row the same bits as that split's first tile, and prints the fastest (tile, split) per row count.
GPU only; a tuning aid for INVARIANT_TILES and INVARIANT_SPLIT_FROM_K."""
import argparse
import itertools

import triton

import torch
import torch.nn.functional as F

from bench.skinny_probe import SHAPES, graph_us
from engine import triton_linear

PRODUCTS = {**SHAPES, "lm_head": (50304, 1024, False)}  # name: (N, K, GELU)
TILES = [(16, 32, 4), (16, 64, 4), (32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 128, 4), (128, 128, 8),
         (128, 256, 8)]  # (BLOCK_M, BLOCK_N, warps)
SPLITS = (1, 2, 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", default="1,16,64,128,512,2048")
    args = p.parse_args()
    print(torch.cuda.get_device_name())
    for M, (name, (N, K, gelu)) in itertools.product((int(r) for r in args.rows.split(",")), PRODUCTS.items()):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        b = None if name == "lm_head" else torch.randn(N, device="cuda", dtype=torch.bfloat16)
        product = triton_linear.invariant_gelu_product if gelu else triton_linear.invariant_linear
        engine_us = graph_us(lambda: product(x, w, b))
        cublas_us = graph_us(lambda: F.linear(x, w, b))
        timed, other_bits = [], []
        for split in SPLITS:
            first = None
            for block_m, block_n, warps in TILES:
                tiling = (block_m, block_n, 64, split, warps)
                if split > 1 and triton.cdiv(N, block_n) > triton_linear.MAX_TILES:
                    continue
                run = lambda: triton_linear.linear(x, w, b, tiling, gelu)
                try:
                    out = run()
                    first = out if first is None else first
                    if not torch.equal(out, first):
                        other_bits.append(tiling)
                    timed.append((graph_us(run), tiling))
                except Exception as e:  # a tile that does not compile (shared memory) is skipped
                    print(f"  {name} M={M} {tiling}: {type(e).__name__}")
        timed.sort()
        best = "  ".join(f"{us:.1f} {m}x{n}/split{s}/w{wp}" for us, (m, n, _, s, wp) in timed[:4])
        print(f"M={M:4d} {name:11s} cublas {cublas_us:6.1f} engine {engine_us:6.1f} "
              f"{triton_linear.invariant_tiling(M, K)}  best {best}"
              f"{'  OTHER BITS: ' + str(other_bits) if other_bits else ''}", flush=True)


if __name__ == "__main__":
    main()
