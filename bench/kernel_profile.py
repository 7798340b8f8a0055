"""The GPU kernels of one decode step, by time: `python -m bench.kernel_profile [--batches 1,128] [--ctx 512]`.

A tuning aid (GPU): the engine's decode CUDA graph for each batch size (every request decoding, the context
around --ctx), replayed under torch.profiler; per kernel name, how many launches a step makes and the µs they
take, longest first, and the step's kernel count and device time. Where a step at batch 1 takes far longer than
reading the weights would, this says which launches to fuse. Writes <out>/kernel_profile.txt as well.
"""
import argparse
import collections
import os

import torch
from torch.profiler import ProfilerActivity, profile

from bench import engine
from bench.common import device_tag
from bench.decode import decoding_engine

REPLAYS = 20


def kernel_table(runner, batch: int, ctx: int) -> tuple[list[tuple[str, int, float]], float]:
    """[(kernel name, launches per step, µs per step)], longest first, and the step's kernel µs in all."""
    manager, requests = decoding_engine(runner, batch, ctx, iters=8)
    graph = runner.graphs.graphs[next(b for b in runner.graphs.buckets if b >= batch)]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
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
    return rows, sum(us for _, _, us in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--batches", default="1,128")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--out", default=None, help="directory of kernel_profile.txt (default bench/results/<gpu>)")
    args = p.parse_args()
    device = torch.device("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    runner = engine.build_runner(args.model, device, torch.bfloat16, num_blocks=max(batches) * (args.ctx // 16 + 4),
                                 max_batch=max(batches))
    lines = [f"{torch.cuda.get_device_name(device)}, {args.model} bf16, decode graph at context ~{args.ctx}"]
    for batch in batches:
        rows, total = kernel_table(runner, batch, args.ctx)
        lines += ["", f"batch {batch}: {sum(n for _, n, _ in rows)} kernels, {total:.0f} us of kernels per step",
                  f"{'launches':>8} {'us':>8} {'share':>6}  kernel"]
        lines += [f"{n:>8} {us:>8.1f} {us / total:>6.1%}  {name[:110]}" for name, n, us in rows]
    text = "\n".join(lines)
    print(text)
    out = args.out or os.path.join("bench", "results", device_tag(device))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernel_profile.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
