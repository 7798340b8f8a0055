"""`timeline-overhead`: what recording the schedule (telemetry/timeline.py, GET /timeline) costs the engine. In
process, dynamic policy, the engine stepped on this thread, two cases:

  burst     every request at t=0: mostly steps of decodes only, which the recorder counts without visiting;
  arrivals  a request joins every --every steps while the others decode: many steps mix one prefill with a full
            batch of decodes, the recorder's dearest step (it looks through the plan for the prefill).

Each case runs without and then with the timeline. The cost is measured directly: the time spent inside the
recorder's calls (arrived, admitted, preempted, stepped, finished), over the engine's time in step(). That share
is the figure; the two runs' tokens/s are beside it as a check (on a CPU their noise is larger than the cost).
Reading a snapshot (what GET /timeline does, on an HTTP thread) is timed too.
"""
import argparse
import time

from bench import engine
from bench.common import ResultFile, resolve, run_info
from bench.workloads import seed_burst
from telemetry.timeline import Timeline

CPU = dict(requests=32, every=2)
FULL = dict(requests=128, every=2)
RECORDER_CALLS = ("arrived", "admitted", "preempted", "stepped", "finished")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, help="requests per case, seed-burst lengths (cpu 32, full 128)")
    p.add_argument("--every", type=int, help="engine steps between two arrivals in the arrivals case (2)")
    p.add_argument("--max-batch", type=int, default=128, help="the server's MAX_BATCH")
    p.add_argument("--max-step-tokens", type=int, default=2048, help="the server's MAX_STEP_TOKENS")


class TimedTimeline(Timeline):
    """A Timeline that adds up the time spent in its engine-side calls (with one clock read each of its own, so
    it overstates the cost a little)."""

    def __init__(self):
        super().__init__()
        self.seconds, self.calls = 0.0, 0


def _timed(method):
    def timed(self, *args):
        start = time.perf_counter()
        method(self, *args)
        self.seconds += time.perf_counter() - start
        self.calls += 1
    return timed


for _name in RECORDER_CALLS:
    setattr(TimedTimeline, _name, _timed(getattr(Timeline, _name)))


def run_case(runner, args: argparse.Namespace, every: int, timeline: Timeline | None) -> dict:
    """Step the engine until every request is done; `every` 0 sends them all at once."""
    manager = engine.make_manager(runner, "dynamic", args.max_batch, args.max_step_tokens)
    if timeline is not None:
        manager.attach_timeline(timeline)
    pending = [engine.make_inference(r) for r in seed_burst(args.requests, seed=args.seed)]
    inferences, steps, engine_s, tick = list(pending), 0, 0.0, 0
    while True:
        if pending and (every == 0 or tick % every == 0):
            arriving = pending if every == 0 else pending[:1]
            pending = [] if every == 0 else pending[1:]
            for inf in arriving:
                manager.enqueue(inf)
        start = time.perf_counter()
        ran = manager.step()
        engine_s += time.perf_counter() - start
        steps, tick = steps + ran, tick + 1
        if not ran and not pending:
            break
    output_tokens = sum(engine.record(inf).output_tokens for inf in inferences)
    return dict(steps=steps, engine_s=engine_s, output_tokens=output_tokens, tokens_per_s=output_tokens / engine_s)


def snapshot_ms(timeline: Timeline, since: int) -> float:
    start = time.perf_counter()
    timeline.snapshot(since)
    return (time.perf_counter() - start) * 1e3


def measure(runner, args: argparse.Namespace, case: str, every: int) -> dict:
    without = run_case(runner, args, every, None)
    timeline = TimedTimeline()
    with_timeline = run_case(runner, args, every, timeline)
    steps = with_timeline["steps"]
    return dict(case=case, requests=args.requests, every=every, steps=steps,
                step_ms=with_timeline["engine_s"] / steps * 1e3,
                recorder_us_per_step=timeline.seconds / steps * 1e6, recorder_calls=timeline.calls,
                recorder_share=timeline.seconds / with_timeline["engine_s"],
                tokens_per_s_without=without["tokens_per_s"], tokens_per_s_with=with_timeline["tokens_per_s"],
                snapshot_full_ms=snapshot_ms(timeline, 0), snapshot_last_10_steps_ms=snapshot_ms(timeline, steps - 10))


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, CPU, FULL)
    result = ResultFile(args, "timeline-overhead", run_info(device, dtype, args.model))
    runner = engine.build_runner(args.model, device, dtype, max_batch=args.max_batch)
    engine.warm_up(runner)
    for case, every in (("burst", 0), ("arrivals", args.every)):
        row = measure(runner, args, case, every)
        print(f"{case}: {row['steps']} steps of {row['step_ms']:.2f} ms; recording {row['recorder_us_per_step']:.1f} "
              f"us per step = {row['recorder_share']:.3%} of step time; tokens/s {row['tokens_per_s_without']:.0f} "
              f"without, {row['tokens_per_s_with']:.0f} with; snapshot {row['snapshot_full_ms']:.2f} ms",
              flush=True)
        result.add(row)
    return result.finish()
