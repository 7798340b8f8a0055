"""`python -m bench.skinny_probe`: a decode step's four products per layer (gpt2-medium's shapes, bf16) at a few
row counts, cuBLAS (F.linear; c_fc through cuBLASLt's bias + GELU epilogue, as the engine runs it) beside
engine/triton_linear.py's kernel over a sweep of tilings (every row in one tile) and the engine's own tiling up to
triton_linear.MAX_ROWS rows: microseconds per product, each timed as back-to-back calls in a CUDA graph, and the
weights' bytes over that time. As in a decode step, the weights come from HBM: the calls go through copies of them
that together are larger than twice L2 (the same weights again and again would stay in L2 and flatter every
kernel). With PDL (engine/pdl.py) each Triton product prefetches its weights while the one before runs, as in a
decode step. GPU only; prints a table and the best tiling per shape."""
import argparse
import itertools

import triton

import torch
import torch.nn.functional as F

from engine import triton_linear

SHAPES = {"c_attn": (3072, 1024, False), "attn.c_proj": (1024, 1024, False), "c_fc": (4096, 1024, True),
          "mlp.c_proj": (1024, 4096, False)}  # name: (N, K, GELU)
FEW_ROWS = list(itertools.product((16, 32, 64), (64, 128), (1, 2, 4, 8), (4,)))  # (BLOCK_N, BLOCK_K, SPLIT_K, warps)
MANY_ROWS = list(itertools.product((32, 64, 128), (64,), (1, 2, 4), (4, 8)))  # a larger accumulator: more warps
COLD_BYTES = 128 << 20  # more than twice an H100's or H200's L2
Tiling = tuple[int, int, int, int, int]


def graph_us(call, repeats: int = 20, replays: int = 20) -> float:
    """Microseconds per call: `repeats` calls captured in one CUDA graph, replayed `replays` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (repeats * replays)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", default="1,32,128,256")
    args = p.parse_args()
    print(torch.cuda.get_device_name())
    for M in (int(r) for r in args.rows.split(",")):
        for name, (N, K, gelu) in SHAPES.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            copies = max(20, -(-COLD_BYTES // (N * K * 2)))
            weights = [(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5,
                        torch.randn(N, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]
            w, b = weights[0]
            cold = lambda product: graph_us(lambda it=itertools.cycle(weights): product(*next(it)), repeats=copies,
                                            replays=10)
            if gelu:
                cublas = cold(lambda w, b: torch._addmm_activation(b, x, w.t(), use_gelu=True))
            else:
                cublas = cold(lambda w, b: F.linear(x, w, b))
            want = F.gelu(F.linear(x, w, b).float(), approximate="tanh") if gelu else F.linear(x, w, b).float()
            best = None
            for cfg in FEW_ROWS if M <= 64 else MANY_ROWS:
                if triton.cdiv(N, cfg[0]) > triton_linear.MAX_TILES or cfg[2] * cfg[1] > K:
                    continue
                tiling: Tiling = (max(16, triton.next_power_of_2(M)), *cfg)
                try:
                    got = triton_linear.linear(x, w, b, tiling, gelu).float()
                    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
                        print(f"  {name} M={M} {cfg}: wrong result")
                        continue
                    us = cold(lambda w, b: triton_linear.linear(x, w, b, tiling, gelu))
                except Exception as e:  # a tiling that does not compile (shared memory) is skipped
                    print(f"  {name} M={M} {cfg}: {type(e).__name__}")
                    continue
                if best is None or us < best[0]:
                    best = (us, tiling)
            engine = ""
            if M <= triton_linear.MAX_ROWS:  # the engine's tiling
                default = triton_linear.few_rows_config(M, N, K)
                engine = f"  engine's {cold(lambda w, b: triton_linear.linear(x, w, b, default, gelu)):6.1f} us"
            gb = N * K * 2 / 1e3  # the weights' bytes over this, per us: GB/s
            print(f"M={M:4d} {name:12s} cublas {cublas:6.1f} us ({gb / cublas:5.0f} GB/s){engine}  best {best[0]:6.1f} "
                  f"us ({gb / best[0]:5.0f} GB/s) {best[1]}", flush=True)


if __name__ == "__main__":
    main()
