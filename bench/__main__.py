"""python -m bench <command> [flags]: the benchmark suite (`python -m bench <command> -h` for flags).

  throughput    in-process output tokens/s of nobatch/static/dynamic beside HF transformers peers
  http          the same workloads over HTTP against ./server.sh, one server per policy
  scale         output tokens/s over HTTP with 1, 2, ... engine processes (ENGINES), one per GPU
  decode        ms per decode step by batch size at a fixed context, beside the memory-bandwidth roofline
  prefill       prompt tokens/s of prefill by prompt length, as a share of the card's measured matmul throughput
  longtail      a long-tailed burst in-process and over HTTP, beside the bound for its schedule
  poisson       Poisson arrivals at rising QPS over HTTP: TTFT, TPOT, ITL, E2E, goodput per policy
  interference  p99 inter-token latency of running decodes while long prompts arrive, chunked prefill or not
  timeline-overhead  what recording the schedule (GET /timeline) costs per engine step
  prefix        in-process tokens/s and TTFT with the prefix cache on vs off (shared prompt, chat, no sharing)
  report        redraw the plots and results.md from the JSON files of an output directory

Each writes <out>/<command>.json and .png (default out: bench/results/<device>). Sizes are small on a CPU and
the full ones of bench/README.md on a GPU or with --full.
"""
import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the engine's modules

COMMANDS = {"throughput": "bench.throughput", "http": "bench.http_throughput", "scale": "bench.scale",
            "decode": "bench.decode", "prefill": "bench.prefill", "longtail": "bench.longtail",
            "poisson": "bench.poisson", "interference": "bench.interference",
            "timeline-overhead": "bench.timeline_overhead", "prefix": "bench.prefix", "report": "bench.report"}


def parser() -> argparse.ArgumentParser:
    from bench.common import add_common_arguments
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.__doc__.split("\n")[0])
        if name != "report":
            add_common_arguments(sub)
        module.add_arguments(sub)
        sub.set_defaults(func=module.main)
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    print(args.func(args))
