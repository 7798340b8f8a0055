"""Our engine in-process: one model runner shared by the policies, a workload replayed through a
BatchingManager stepped on this thread, and each finished request turned into a telemetry.latency.RequestRecord.

`batching` is imported where it is used: it needs tiktoken (streamed detokenisation), and the HF peers of a
benchmark must still run where tiktoken is not installed.
"""
import contextlib
import time
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from bench.common import weights_for
from client.workload import Request
from telemetry.latency import RequestRecord
from engine.device import resolve_attention, resolve_overlap
from engine.loader import load_model
from engine.runner import ModelRunner
from engine.params import SamplingParams

Step = list[tuple[int, int, bool]]  # per sequence: tokens in the cache, new tokens, whether it samples


def build_runner(model: str, device: torch.device, dtype: torch.dtype, num_blocks: int | None = None,
                 kv_cache_gb: float = 2.0, max_batch: int = 256, max_step_tokens: int = 2048,
                 batch_invariant: bool = False) -> ModelRunner:
    """The server's runner for `model` (its attention, and decode graphs up to max_batch on a GPU; with
    batch_invariant, BATCH_INVARIANT's); the KV pool is sized as the server sizes it unless num_blocks is given."""
    gpt, _ = load_model(model, weights_for(model))
    return ModelRunner(gpt, device, dtype, num_blocks=num_blocks, kv_cache_gb=kv_cache_gb, seed=0,
                       attention=resolve_attention("auto", device, batch_invariant), cuda_graphs=True,
                       max_batch=max_batch, max_step_tokens=max_step_tokens)


def make_manager(runner: ModelRunner, policy: str, max_batch: int, max_step_tokens: int,
                 overlap_steps: str = "auto"):
    """The server's engine; `overlap_steps` is its OVERLAP_STEPS setting."""
    from batching import BatchingManager, make_policy
    return BatchingManager(runner, make_policy(policy, max_batch), max_step_tokens, max_waiting=1 << 20,
                           overlap=resolve_overlap(overlap_steps, runner.device))


def make_inference(request: Request):
    """Greedy with EOS ignored, so the request (of token ids) produces exactly num_tokens tokens."""
    from batching import Inference
    return Inference("", request.prompt, SamplingParams(max_tokens=request.num_tokens, temperature=0))


def record(inf) -> RequestRecord:
    if inf.finish_reason != "length":
        raise RuntimeError(f"request {inf.request_id} ended with {inf.finish_reason}: {inf.error}")
    return RequestRecord(arrival=inf.arrival_time, first_token=inf.first_token_time, finish=inf.finish_time,
                         prompt_tokens=len(inf.prompt_ids), output_tokens=len(inf.output_ids),
                         requested_tokens=inf.params.max_tokens, token_times=list(inf.token_times))


class Burst(NamedTuple):
    records: list[RequestRecord]
    steps: int  # the engine's steps, back to back from the first arrival to the last finish


def run_burst(runner: ModelRunner, policy: str, requests: list[Request], max_batch: int, max_step_tokens: int,
              desc: str | None = None, overlap_steps: str = "auto") -> Burst:
    """All requests arrive at once; the engine steps on this thread until every one has finished."""
    manager = make_manager(runner, policy, max_batch, max_step_tokens, overlap_steps)
    with tqdm(total=len(requests), desc=desc, unit="req", leave=False) as bar:
        manager.on_finish.append(lambda inf: bar.update())
        inferences = [manager.enqueue(make_inference(r)) for r in requests]
        while manager.step():
            pass
    return Burst([record(inf) for inf in inferences], manager.steps)


def warm_up(runner: ModelRunner) -> None:
    """One small mixed batch, so first-call costs (allocator, kernels, thread pools) stay out of the timings."""
    run_burst(runner, "dynamic", [Request(list(range(1, 33)), 4), Request([1, 2, 3], 8)], 8, 256)


@contextlib.contextmanager
def recorded_steps(runner: ModelRunner, tables: list[np.ndarray] | None = None,
                   times: list[list[float | None]] | None = None) -> Iterator[list[Step]]:
    """Every step the runner launches inside the block, as launched (before the engine counts its tokens in); with
    `tables`, each step's block tables appended to it (a copy, for roofline.distinct_kv_tokens after the run); with
    `times`, each step's [launched, tokens read] perf_counter times (None: never waited for)."""
    steps: list[Step] = []
    launch = runner.launch

    def recording(plan):
        launched_at = time.perf_counter()
        launched = launch(plan)
        sampling = set(launched.ids)
        steps.append([(seq.num_computed, n, seq.id in sampling) for seq, n in plan])
        if tables is not None:
            tables.append(runner.block_manager.table_array([seq.id for seq, _ in plan]))
        if times is not None:
            span: list[float | None] = [launched_at, None]
            times.append(span)
            wait = launched.wait

            def timed_wait():
                out = wait()
                span[1] = time.perf_counter()
                return out

            launched.wait = timed_wait
        return launched

    runner.launch = recording
    try:
        yield steps
    finally:
        del runner.launch
