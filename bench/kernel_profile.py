"""The GPU kernels of one decode step, by time: `python -m bench.kernel_profile [--batches 1,128] [--ctx 512]
[--batch-invariant]`.

A tuning aid (GPU): the engine's decode CUDA graph for each batch size (every request decoding, the context
around --ctx), replayed under torch.profiler; per kernel name, how many launches a step makes and the µs they
take, longest first, and the step's kernel count, device time and wall time. Where a step at batch 1 takes far
longer than reading the weights would, this says which launches to fuse. With --batch-invariant, BATCH_INVARIANT's
whole engine step (its decodes replay the mixed graphs, then the vocab projection and the sampler run eagerly):
a wall time well above the kernels' says the host is what the step waits for. Writes <out>/kernel_profile.txt.
"""
import argparse
import collections
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import engine
from bench.common import device_tag
from bench.decode import decoding_engine

REPLAYS = 20


def kernel_table(runner, batch: int, ctx: int) -> tuple[list[tuple[str, int, float]], float, float]:
    """[(kernel name, launches per step, µs per step)], longest first, the step's kernel µs in all, and its wall
    µs: the decode graph's replay, or the whole engine step where there is no decode graph (BATCH_INVARIANT)."""
    manager, requests = decoding_engine(runner, batch, ctx, iters=8 if runner.graphs else 2 * REPLAYS + 16)
    if runner.graphs:
        step = runner.graphs.graphs[next(b for b in runner.graphs.buckets if b >= batch)].replay
    else:  # every step decodes one more token of each request: enough of them for the warm-up and both timings
        step = manager.step
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPLAYS):
        step()
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6 / REPLAYS
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            step()
        torch.cuda.synchronize()
    launches, micros = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            launches[event.name] += 1
            micros[event.name] += event.device_time
    for r in requests:
        manager.abort(r)
    while manager.step():
        pass
    rows = sorted(((name, launches[name] // REPLAYS, micros[name] / REPLAYS) for name in launches),
                  key=lambda row: -row[2])
    return rows, sum(us for _, _, us in rows), wall_us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--batches", default="1,128")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--batch-invariant", action="store_true", help="BATCH_INVARIANT's engine step")
    p.add_argument("--out", default=None, help="directory of kernel_profile.txt (default bench/results/<gpu>)")
    args = p.parse_args()
    device = torch.device("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    runner = engine.build_runner(args.model, device, torch.bfloat16, num_blocks=max(batches) * (args.ctx // 16 + 8),
                                 max_batch=max(batches), batch_invariant=args.batch_invariant)
    what = "BATCH_INVARIANT's engine step" if args.batch_invariant else "decode graph"
    lines = [f"{torch.cuda.get_device_name(device)}, {args.model} bf16, {what} at context ~{args.ctx}"]
    for batch in batches:
        rows, total, wall = kernel_table(runner, batch, args.ctx)
        lines += ["", f"batch {batch}: {sum(n for _, n, _ in rows)} kernels, {total:.0f} us of kernels per step, "
                      f"{wall:.0f} us wall",
                  f"{'launches':>8} {'us':>8} {'share':>6}  kernel"]
        lines += [f"{n:>8} {us:>8.1f} {us / total:>6.1%}  {name[:110]}" for name, n, us in rows]
    text = "\n".join(lines)
    print(text)
    out = args.out or os.path.join("bench", "results", device_tag(device))
    os.makedirs(out, exist_ok=True)
    name = "kernel_profile_invariant.txt" if args.batch_invariant else "kernel_profile.txt"
    with open(os.path.join(out, name), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
