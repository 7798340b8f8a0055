"""`prefill`: prompt tokens/s of our engine's prefill by prompt length, and its share of the card's matmul peak.

For each prompt length of a sweep, N random prompts all at t=0, each asking for one token (so the run is their
prefill), through our dynamic engine in-process: prompt tokens/s over wall-clock (first arrival to last finish),
the FLOPs of those prefills (bench.roofline.forward_flops), the TFLOP/s achieved and its share of the matmul
throughput in the run's dtype (bf16 on a GPU), measured in the same run (bench.roofline.matmul_throughput).
The prefix cache is off: random prompts share nothing, but a repeat would find its own prompts cached.
"""
import argparse
import random

from bench import engine, roofline
from bench.common import ResultFile, resolve, run_info
from bench.throughput import add_engine_arguments, kv_blocks_for, overlap_setting, run, warm_runner
from bench.workloads import GPT2_VOCAB
from client.workload import Request
from model import GPTConfig
from telemetry.latency import summarize

CPU = dict(prompt_lengths="32,64,128", requests=8, repeats=1)
FULL = dict(prompt_lengths="128,256,512,896", requests=256, repeats=3)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-lengths", help="comma list of prompt lengths in tokens (cpu 32,64,128; full "
                                            "128,256,512,896)")
    p.add_argument("--requests", type=int, help="prompts per length (cpu 8, full 256)")
    p.add_argument("--repeats", type=int, help="run each length this many times (cpu 1, full 3)")
    add_engine_arguments(p)


def prompts(n: int, length: int, seed: int) -> list[Request]:
    """n random prompts of `length` tokens, one output token each."""
    rng = random.Random(seed)
    return [Request([rng.randrange(GPT2_VOCAB) for _ in range(length)], 1) for _ in range(n)]


def prefill_flops(config: GPTConfig, requests: list[Request]) -> int:
    """Every prompt from an empty cache, its first token sampled."""
    return sum(roofline.forward_flops(config, 0, len(r.prompt), True) for r in requests)


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, CPU, FULL)
    works = {length: prompts(args.requests, int(length), args.seed) for length in args.prompt_lengths.split(",")}
    result = ResultFile(args, "prefill", run_info(device, dtype, args.model))
    runner = warm_runner(args, device, dtype, kv_blocks_for(works))
    runner.block_manager.prefix_caching = False
    peak = roofline.matmul_throughput(device, dtype, runner.model.config.n_embd)
    result.data["matmul_peak_tflops"] = peak / 1e12
    print(f"matmul throughput {peak / 1e12:.2f} TFLOP/s", flush=True)
    for requests in works.values():
        for _ in range(args.repeats):
            row = dict(prompt_tokens=len(requests[0].prompt), requests=len(requests), max_batch=args.max_batch,
                       max_step_tokens=args.max_step_tokens)
            run(result, row, lambda: measure(runner, requests, args, peak))
    return result.finish()


def measure(runner, requests: list[Request], args: argparse.Namespace, peak: float) -> dict:
    burst = engine.run_burst(runner, "dynamic", requests, args.max_batch, args.max_step_tokens,
                             desc=f"prefill {len(requests[0].prompt)}", overlap_steps=overlap_setting(args))
    seconds = summarize(burst.records)["duration_s"]
    flops = prefill_flops(runner.model.config, requests)
    return dict(seconds=seconds, tokens_per_s=sum(len(r.prompt) for r in requests) / seconds, flops=flops,
                tflops=flops / seconds / 1e12, matmul_peak_tflops=peak / 1e12, of_matmul_peak=flops / seconds / peak,
                steps=burst.steps, ms_per_step=seconds / burst.steps * 1e3)
