"""`longtail`: a long-tailed burst through our engine, in-process and over HTTP, beside the bound for its schedule.

The burst: lognormal prompt and output lengths (ShareGPT-like, bench.scale.LONGTAIL), every request at t=0, our
dynamic engine in this process, then `./server.sh dynamic` with one engine and the streaming client.

The bound is for exactly the schedule that ran in-process: each step the engine launched is recorded as it is
launched (per sequence: its tokens in the cache, its new tokens, whether it samples) and charged its floor
(bench.roofline.step_floor_s): its weights and K/V read at the copy bandwidth, or its FLOPs at the matmul
throughput, whichever is longer, both measured in this run. Bound tokens/s = output tokens / the sum of the floors.
The HTTP row is held to the same bound: the server runs the same engine with the same settings on the same
requests; the transport changes when, and in what order, they reach it, and with that the schedule a little (the
server's steps, from its /timeline, are in the row).
"""
import argparse

import torch

from bench import engine, roofline
from bench.common import ResultFile, resolve, run_info
from bench.http_throughput import WARM_UP, measured_load
from bench.scale import LONGTAIL
from bench.server import add_server_arguments, policy_server, send_load, stream_intervals
from bench.throughput import add_engine_arguments, kv_blocks_for, overlap_setting, run, warm_runner
from bench.workloads import long_tailed
from client.workload import Request
from engine.runner import kv_bytes_per_token
from telemetry.latency import summarize

CPU = dict(requests=48)
FULL = dict(requests=1000)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p)
    p.set_defaults(engines=1)  # the bound is one engine's
    p.add_argument("--requests", type=int, help="long-tailed burst size (cpu 48, full 1000)")
    add_engine_arguments(p)


def kv_blocks(requests: list[Request], max_batch: int, context: int = 1024, block_size: int = 16) -> int:
    """A pool that holds every request at full length, or max_batch of them at the full context where that is
    less: the dynamic policy runs at most max_batch at once, so nothing is preempted either way."""
    return min(kv_blocks_for({"longtail": requests}, block_size), max_batch * -(-context // block_size))


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, CPU, FULL)
    requests = long_tailed(args.requests, **LONGTAIL, seed=args.seed)
    result = ResultFile(args, "longtail", run_info(device, dtype, args.model))
    row, limits = in_process(args, device, dtype, requests)
    result.data.update(limits)
    result.add(row)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the runner's pool and graphs are gone: the server sizes its own from free memory
    for interval in stream_intervals(args):  # a server each
        server = {} if interval is None else dict(stream_interval_ms=interval)
        run(result, dict(requests=len(requests), over_http=True, **server),
            lambda: over_http(args, device, dtype, requests, row["bound_tokens_per_s"], interval))
    return result.finish()


def in_process(args: argparse.Namespace, device, dtype, requests: list[Request]) -> tuple[dict, dict]:
    """The burst through our engine here, its schedule recorded; its row with the bound, and the card's limits."""
    runner = warm_runner(args, device, dtype, kv_blocks(requests, args.max_batch))
    bandwidth = roofline.copy_bandwidth(device)
    matmul = roofline.matmul_throughput(device, dtype, runner.model.config.n_embd)
    with engine.recorded_steps(runner) as steps:
        burst = engine.run_burst(runner, "dynamic", requests, args.max_batch, args.max_step_tokens,
                                 desc="longtail in-process", overlap_steps=overlap_setting(args))
    weights, kv_per_token = roofline.weight_bytes(runner.model), kv_bytes_per_token(runner.model, dtype)
    bound_s = sum(roofline.step_floor_s(runner.model.config, step, weights, kv_per_token, bandwidth, matmul)
                  for step in steps)
    summary = summarize(burst.records)
    bound = summary["output_tokens"] / bound_s
    row = dict(requests=len(requests), over_http=False, output_tokens_per_s=summary["output_tokens_per_s"],
               bound_tokens_per_s=bound, of_bound=summary["output_tokens_per_s"] / bound,
               seconds=summary["duration_s"], bound_s=bound_s, output_tokens=summary["output_tokens"],
               steps=burst.steps, ms_per_step=summary["duration_s"] / burst.steps * 1e3,
               bound_ms_per_step=bound_s / len(steps) * 1e3, metrics=summary)
    print(f"in-process: {row['output_tokens_per_s']:.1f} tok/s, bound {bound:.1f} ({row['of_bound']:.0%}); "
          f"{burst.steps} steps of {row['ms_per_step']:.2f} ms, floor {row['bound_ms_per_step']:.2f} ms", flush=True)
    limits = dict(copy_GBps=bandwidth / 1e9, matmul_peak_tflops=matmul / 1e12, weight_GB=weights / 1e9,
                  kv_bytes_per_token=kv_per_token)
    return row, limits


def over_http(args: argparse.Namespace, device, dtype, requests: list[Request], bound: float,
              stream_interval_ms: float | None) -> dict:
    """The burst through a real server, held to the in-process schedule's bound (tokens/s)."""
    with policy_server(args, "dynamic", device, dtype, stream_interval_ms) as (url, health):
        send_load(url, WARM_UP)
        row = measured_load(url, health, requests, "longtail over HTTP")
    achieved = row.get("metrics", {}).get("output_tokens_per_s")
    return row | dict(output_tokens_per_s=achieved, bound_tokens_per_s=bound,
                      of_bound=achieved / bound if achieved else None, server=health)
