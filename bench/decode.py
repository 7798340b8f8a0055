"""`decode`: milliseconds per decode step of our engine at fixed batch sizes and context, beside the roofline.

Each batch is `batch` requests decoding in our engine (a BatchingManager stepped on this thread, as the server
steps it), timed between the ends of consecutive steps once every prompt is in the cache: what a decode step of
the server costs, host side included (packing, sampling, reading the tokens back, the requests' bookkeeping). On
a GPU the engine prepares and launches each step while the one before still runs, so the host's work hides
behind the GPU's where it is shorter. The context grows by a token a step; the prompts are sized so that the
timed steps attend over `ctx` tokens on average. The model's forward alone is timed too (on a GPU the decode
graph replayed back to back). Reference lines from the same process: HF transformers' decode step at the same
batch and context, and on a GPU an idealised step (contiguous cache, SDPA, one CUDA graph, replayed back to back).
"""
import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from bench import engine, ideal_step, peers, roofline
from bench.common import ResultFile, resolve, run_info, sync
from client.workload import Request
from engine.runner import ModelRunner, kv_bytes_per_token

CPU = dict(batches="1,8,32,64")
FULL = dict(batches="1,8,32,128,256")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", help="comma list of batch sizes (cpu 1,8,32,64; full 1,8,32,128,256)")
    p.add_argument("--ctx", type=int, default=512, help="tokens in context at each step")
    p.add_argument("--iters", type=int, default=20, help="timed steps per batch size at most")
    p.add_argument("--seconds", type=float, default=10.0, help="time budget per batch size (at least 3 steps)")
    p.add_argument("--peers", default="hf", help="hf: time HF transformers' decode step at the same sizes "
                                                 "(empty: none)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="also time each batch with BATCH_INVARIANT (invariant_step_ms) and report its cost "
                        "(invariant_of_default: the default step's ms over its)")


def timed(step: Callable[[], object], device: torch.device, iters: int, seconds: float) -> list[float]:
    """Seconds of each call of `step` after two warm-up calls: at most `iters` calls, fewer if `seconds` run
    out, but at least 3."""
    for _ in range(2):
        step()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < iters and (len(times) < 3 or time.perf_counter() < deadline):
        sync(device)
        start = time.perf_counter()
        step()  # each step reads its sampled tokens back to the host: it is over when this returns
        times.append(time.perf_counter() - start)
    return times


def decoding_engine(runner: ModelRunner, batch: int, ctx: int, iters: int):
    """An engine whose `batch` requests all decode, `iters` steps from the end of their prompts' prefill (done in
    one step, so that every request starts decoding at once); returns the manager and the requests."""
    rng = random.Random(batch)
    vocab = runner.model.config.vocab_size
    prompt_len = max(1, ctx - 2 - (iters + 1) // 2)  # two warm-up steps, then iters steps around ctx
    manager = engine.make_manager(runner, "dynamic", batch, batch * prompt_len)
    requests = [manager.enqueue(engine.make_inference(Request([rng.randrange(vocab) for _ in range(prompt_len)],
                                                              iters + 8))) for _ in range(batch)]
    while not all(r.output_ids for r in requests):
        manager.step()
    return manager, requests


def time_steps(manager, iters: int, seconds: float) -> list[float]:
    """Seconds between the ends of consecutive engine steps after two warm-up steps: at most `iters` steps, fewer
    if `seconds` run out, at least 3."""
    for _ in range(2):
        manager.step()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    last = time.perf_counter()
    while len(times) < iters and (len(times) < 3 or time.perf_counter() < deadline):
        manager.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def time_our_step(runner: ModelRunner, batch: int, ctx: int, iters: int, seconds: float) -> dict:
    """Median ms of the engine's decode step and of the model's forward alone (on a GPU the decode graph's
    replay, over the inputs of the batch's last step)."""
    manager, requests = decoding_engine(runner, batch, ctx, iters)
    forward_times: list[float] = []

    def before_forward(*_):
        sync(runner.device)
        forward_times.append(-time.perf_counter())

    def after_forward(*_):
        sync(runner.device)
        forward_times[-1] += time.perf_counter()

    hooks = [runner.model.register_forward_pre_hook(before_forward), runner.model.register_forward_hook(after_forward)]
    try:
        step_times = time_steps(manager, iters, seconds)
    finally:
        for h in hooks:
            h.remove()
    assert not any(r.done for r in requests), "a request finished"
    if runner.graphs:  # a replayed graph runs no Python forward: time the decode graph's replay alone
        graph = runner.graphs.graphs[next(b for b in runner.graphs.buckets if b >= batch)]
        forward_times = timed(lambda: (graph.replay(), sync(runner.device)), runner.device, iters, seconds)
    else:  # the timed steps' eager forwards (none where the mixed graphs ran them: BATCH_INVARIANT's decodes)
        forward_times = forward_times[-len(step_times):] or step_times
    for r in requests:
        manager.abort(r)
    while manager.step():  # the aborts, and the step still in flight
        pass
    assert runner.block_manager.num_free == runner.block_manager.num_blocks, "the benchmark leaked KV blocks"
    return dict(step_ms=statistics.median(step_times) * 1e3, forward_ms=statistics.median(forward_times) * 1e3,
                steps=len(step_times), graphs=runner.graphs is not None)


def time_invariant_steps(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, result: ResultFile,
                         blocks_per_request: int) -> None:
    """BATCH_INVARIANT's decode step at each batch, beside the default mode's row of the same run."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    batches = [row["batch"] for row in result.data["results"]]
    runner = engine.build_runner(args.model, device, dtype, num_blocks=max(batches) * blocks_per_request,
                                 max_batch=max(batches), batch_invariant=True)
    for row in tqdm(result.data["results"], desc="BATCH_INVARIANT decode batches"):
        try:
            times = time_our_step(runner, row["batch"], args.ctx, args.iters, args.seconds)
            row.update(invariant_step_ms=times["step_ms"])
            if "step_ms" in row:
                row["invariant_of_default"] = row["step_ms"] / times["step_ms"]
        except Exception as e:
            row["invariant_error"] = repr(e)[:500]
        print(row, flush=True)
        result.save()


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, CPU, FULL)
    batches = [int(b) for b in args.batches.split(",")]
    result = ResultFile(args, "decode", run_info(device, dtype, args.model))
    blocks_per_request = -(-(args.ctx + args.iters + 16) // 16)
    runner = engine.build_runner(args.model, device, dtype, num_blocks=max(batches) * blocks_per_request,
                                 max_batch=max(batches))
    bandwidth = roofline.copy_bandwidth(device)
    weights = roofline.weight_bytes(runner.model)
    kv_per_token = kv_bytes_per_token(runner.model, dtype)
    result.data.update(copy_GBps=bandwidth / 1e9, weight_GB=weights / 1e9, kv_bytes_per_token=kv_per_token)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, weights {weights / 1e9:.3f} GB, "
          f"KV {kv_per_token / 1024:.0f} KiB/token")
    for batch in tqdm(batches, desc="decode batches"):
        bytes_read = weights + batch * args.ctx * kv_per_token
        row = dict(batch=batch, ctx=args.ctx, roofline_ms=bytes_read / bandwidth * 1e3)
        try:
            row.update(time_our_step(runner, batch, args.ctx, args.iters, args.seconds))
            row.update(tok_per_s=batch / row["step_ms"] * 1e3, of_roofline=row["roofline_ms"] / row["step_ms"],
                       achieved_GBps=bytes_read / row["step_ms"] / 1e6)
        except Exception as e:  # e.g. out of memory at the largest batch: keep the smaller ones
            row["error"] = repr(e)[:500]
        print(row, flush=True)
        result.add(row)
    config = runner.model.config
    del runner  # its KV pool makes room for the reference lines' caches (and BATCH_INVARIANT's runner's)
    if args.batch_invariant:
        time_invariant_steps(args, device, dtype, result, blocks_per_request)
    rows = {row["batch"]: row for row in result.data["results"]}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        try:
            ideal = ideal_step.run(config, batches, args.ctx, dtype)
        except Exception as e:  # a reference line is optional; our rows stand without it
            ideal = {b: dict(error=repr(e)[:500]) for b in batches}
        for batch, times in ideal.items():
            rows[batch].update({f"ideal_{k}": v for k, v in times.items()})
    if args.peers:
        hf = peers.hf_model(args.model, device, dtype)
        for batch in tqdm(batches, desc="HF decode batches"):
            try:
                times = timed(peers.hf_decode_step(hf, batch, args.ctx, device), device, args.iters, args.seconds)
                rows[batch]["hf_step_ms"] = statistics.median(times) * 1e3
                if "step_ms" in rows[batch]:
                    rows[batch]["ours_vs_hf"] = rows[batch]["hf_step_ms"] / rows[batch]["step_ms"]
            except Exception as e:
                rows[batch]["hf_error"] = repr(e)[:500]
            print(rows[batch], flush=True)
            result.save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result.finish()
