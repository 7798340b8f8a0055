"""Sweep the decode kernel's tile and warps on gpt2-medium's shape (GPU only, a tuning aid)."""
import math
import torch
from triton.testing import do_bench
from engine.attention import triton_decode as td

NH, HS, BS = 16, 64, 16
torch.manual_seed(0)
NB = 16384
k = torch.randn(NB, BS, NH, HS, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
for B, ctx in ((1, 512), (32, 512), (128, 512), (256, 512)):
    W = 64
    tables = torch.randperm(NB, device="cuda")[:B * W].view(B, W).int()
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(B, NH, HS, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    best = []
    for bn in (32, 64, 128):
        for nw in (2, 4, 8):
            for pps in (2, 4, 8):
                td.BLOCK_N, td.NUM_WARPS, td.PROGRAMS_PER_SM = bn, nw, pps
                ms = do_bench(lambda: td.paged_decode_attention(q, k, v, tables, lens, out, 1 / math.sqrt(HS)),
                              return_mode="median")
                gbps = B * ctx * NH * HS * 2 * 2 / ms / 1e6
                best.append((ms, bn, nw, pps, gbps))
    best.sort()
    print(B, ctx, [f"{ms*1e3:.1f}us bn{bn} w{nw} pps{pps} {g:.0f}GB/s" for ms, bn, nw, pps, g in best[:4]],
          "default:", [f"{ms*1e3:.1f}" for ms, bn, nw, pps, g in best if (bn, nw, pps) == (64, 4, 4)], flush=True)
