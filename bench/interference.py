"""`interference`: what long prompts arriving do to the inter-token latency (ITL) of requests already decoding,
with chunked prefill (a small MAX_STEP_TOKENS: a prompt is cut into chunks that share steps with the decodes)
and without (a budget that takes a whole prompt in one step). In-process, dynamic policy.

A few steady decoders start together; every --every engine steps a long prompt arrives, until --long-prompts
have. Counting in steps rather than seconds gives both settings the same arrival pattern on any machine.
"""
import argparse
import random

from bench import engine
from bench.common import ResultFile, resolve, run_info
from bench.workloads import GPT2_VOCAB
from client.workload import Request
from telemetry.latency import distribution
from engine.runner import ModelRunner

CPU = dict(decoders=8, long_prompts=4, long_prompt_len=512, every=12)
FULL = dict(decoders=32, long_prompts=16, long_prompt_len=896, every=16)
DECODER_PROMPT, LONG_PROMPT_OUTPUT = 16, 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoders", type=int, help="steady decoding requests (cpu 8, full 32)")
    p.add_argument("--long-prompts", type=int, help="long prompts that arrive while they decode (cpu 4, full 16)")
    p.add_argument("--long-prompt-len", type=int, help="tokens per long prompt (cpu 512, full 896)")
    p.add_argument("--every", type=int, help="engine steps between long prompts (cpu 12, full 16)")
    p.add_argument("--chunked", type=int, default=256, help="MAX_STEP_TOKENS with chunked prefill")
    p.add_argument("--unchunked", type=int, default=2048, help="MAX_STEP_TOKENS that fits a whole prompt")
    p.add_argument("--max-batch", type=int, default=128, help="the server's MAX_BATCH")


def run_case(runner: ModelRunner, args: argparse.Namespace, max_step_tokens: int) -> dict:
    """One setting: the decoders' ITL (pooled, and as a timeline for the plot), the long prompts' TTFT."""
    rng = random.Random(args.seed)
    ids = lambda n: [rng.randrange(GPT2_VOCAB) for _ in range(n)]
    # decoders outlive the last arrival by a few steps, whatever the chunking
    decoder_len = (args.long_prompts + 2) * args.every
    manager = engine.make_manager(runner, "dynamic", args.max_batch, max_step_tokens)
    decoders = [manager.enqueue(engine.make_inference(Request(ids(DECODER_PROMPT), decoder_len)))
                for _ in range(args.decoders)]
    long_prompts, steps = [], 0
    while manager.step():
        steps += 1
        if steps % args.every == 0 and len(long_prompts) < args.long_prompts:
            long_prompts.append(manager.enqueue(engine.make_inference(Request(ids(args.long_prompt_len),
                                                                              LONG_PROMPT_OUTPUT))))
    decoding = [engine.record(inf) for inf in decoders]
    arriving = [engine.record(inf) for inf in long_prompts]
    t0 = min(r.arrival for r in decoding)
    span = max(r.finish for r in decoding) - t0
    itls = [x for r in decoding for x in r.itls]
    return dict(
        prefill="chunked" if max_step_tokens < args.long_prompt_len + args.decoders else "whole",
        max_step_tokens=max_step_tokens, steps=steps,
        decode_itl_s=distribution(itls),
        decode_itl_max_s=max(itls),
        decode_tokens_per_s=sum(r.output_tokens for r in decoding) / span,
        long_prompt_ttft_s=distribution([r.ttft for r in arriving]),
        long_prompt_arrivals=[round(r.arrival - t0, 6) for r in arriving],
        decode_itl_timeline=dict(t=[round(t - t0, 6) for r in decoding for t in r.token_times[1:]],
                                 itl=[round(x, 6) for x in itls]),
    )


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, CPU, FULL)
    result = ResultFile(args, "interference", run_info(device, dtype, args.model))
    runner = engine.build_runner(args.model, device, dtype, max_batch=args.max_batch)
    engine.warm_up(runner)
    for budget in (args.chunked, args.unchunked):
        row = run_case(runner, args, budget)
        print(f"MAX_STEP_TOKENS={budget}: decode ITL p99 {row['decode_itl_s']['p99'] * 1e3:.1f} ms, "
              f"max {row['decode_itl_max_s'] * 1e3:.1f} ms; long prompt TTFT p50 "
              f"{row['long_prompt_ttft_s']['p50'] * 1e3:.0f} ms", flush=True)
        result.add(row)
    return result.finish()
