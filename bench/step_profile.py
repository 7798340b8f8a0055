"""Where an in-process run spends its time: steps split by kind (decode-only or with prefill), the model
runner's share of each, and the engine's own Python around it (a tuning aid for the GPU)."""
import argparse
import collections
import time

import torch

from bench import engine
from bench.scale import LONGTAIL
from bench.workloads import long_tailed, offline, seed_burst
from engine.device import resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--workload", default="offline", choices=("offline", "burst", "longtail"))
    p.add_argument("--max-batch", type=int, default=128)
    args = p.parse_args()
    device = resolve_device("auto")
    requests = dict(offline=lambda: offline(256, 64, 512), burst=lambda: seed_burst(100),
                    longtail=lambda: long_tailed(1000, **LONGTAIL))[args.workload]()
    runner = engine.build_runner(args.model, device, torch.bfloat16, num_blocks=max(8192, args.max_batch * 64),
                                 max_batch=args.max_batch)
    engine.warm_up(runner)
    engine.run_burst(runner, "dynamic", requests[:32], args.max_batch, 2048)
    times: list = []
    start = time.perf_counter()
    with engine.recorded_steps(runner, times=times) as steps:
        records = engine.run_burst(runner, "dynamic", requests, args.max_batch, 2048).records
    total = time.perf_counter() - start
    tokens = sum(r.output_tokens for r in records)
    print(f"{args.workload}: {tokens} tokens in {total:.2f} s = {tokens / total:.0f} tok/s")
    stats = collections.defaultdict(lambda: [0, 0.0, 0, 0])  # kind -> steps, seconds, decode rows, prefill tokens
    last_read = 0.0
    for step, (launched, read) in zip(steps, times):
        if read is None:  # nothing sampled that the engine waited for
            continue
        # from its launch, or from the read of the step before when the engine launched it while that one ran,
        # to the read of its own sampled tokens
        decodes = sum(1 for _, n, _ in step if n == 1)
        s = stats["decode" if decodes == len(step) else "mixed"]
        s[0] += 1
        s[1] += read - max(launched, last_read)
        last_read = read
        s[2] += decodes
        s[3] += sum(n for _, n, _ in step if n > 1)
    in_runner = 0.0
    for kind, (count, seconds, decodes, prefill) in stats.items():
        in_runner += seconds
        print(f"{kind:6s} steps {count:5d}  {seconds:6.2f} s  {seconds / count * 1e3:6.2f} ms/step  "
              f"decode rows/step {decodes / count:6.1f}  prefill tokens/step {prefill / count:7.1f}")
    print(f"outside the runner (scheduling, post-processing): {total - in_runner:.2f} s")
    eager_step_launch_share(runner)


def eager_step_launch_share(runner) -> None:
    """One mixed step (127 decodes at context 300, one 288-token prompt), eager: the time until the forward
    returns on the host (launching) and until the device is done."""
    if runner.max_batch < 128:
        return
    import numpy as np
    from engine.attention.metadata import pack_step
    bm = runner.block_manager
    ids = list(range(128))
    for i in ids:
        bm.allocate(i, [0] * 300)  # nothing is cached: no cache_computed here
    query = np.array([1] * 127 + [288])
    ctx = np.array([300] * 127 + [288])
    step = pack_step(query, ctx, bm.table_array(ids), bm.block_size)
    tokens = np.zeros(int(query.sum()), dtype=np.int64)
    rows = np.cumsum(query) - 1
    for _ in range(3):
        runner._forward(tokens, step, rows)
    torch.cuda.synchronize()
    launched, done = [], []
    for _ in range(10):
        start = time.perf_counter()
        with torch.inference_mode():
            runner._forward(tokens, step, rows)
        launched.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        done.append(time.perf_counter() - start)
    print(f"eager mixed step: host returns after {np.median(launched) * 1e3:.2f} ms, device done after "
          f"{np.median(done) * 1e3:.2f} ms")
    for i in ids:
        bm.free(i)


if __name__ == "__main__":
    main()
