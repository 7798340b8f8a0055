"""`scale`: output tokens/s over HTTP of one dynamic-batching server with 1, 2, ... engine processes (ENGINES), on
the seed burst, offline and a long-tailed burst, all requests at once. Each engine takes a GPU of its own where
there are enough (the ratio to one engine is then the data-parallel speed-up); with more engines than GPUs they
share them, and on a CPU they share its cores."""
import argparse

from bench import throughput
from bench.common import ResultFile, resolve, run_info
from bench.http_throughput import WARM_UP
from bench.server import policy_server, send_load
from bench.workloads import long_tailed
from serving.master import visible_gpus

CPU = dict(throughput.CPU, longtail_requests=64)
FULL = dict(throughput.FULL, longtail_requests=1000)
LONGTAIL = dict(prompt_median=180, output_median=160, sigma=0.9, context=1024)  # ShareGPT-like


def add_arguments(p: argparse.ArgumentParser) -> None:
    throughput.add_workload_arguments(p)
    p.set_defaults(engines=None)  # set per server, from --engine-counts
    p.set_defaults(workloads="burst,offline,longtail", policies="dynamic")
    p.add_argument("--engine-counts", help="comma list of ENGINES to run (default: 1 and every visible GPU; "
                                           "1,2 on a CPU)")
    p.add_argument("--longtail-requests", type=int, help="long-tailed burst size (cpu 64, full 1000)")
    p.add_argument("--repeats", type=int, default=1, help="run each workload this many times on each server")


def engine_counts(args: argparse.Namespace) -> list[int]:
    if args.engine_counts:
        return [int(n) for n in args.engine_counts.split(",")]
    return sorted({1, max(2, len(visible_gpus()))})


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, CPU, FULL)
    wanted = args.workloads.split(",")
    args.workloads = ",".join(w for w in wanted if w != "longtail")
    works = throughput.workloads(args) if args.workloads else {}
    if "longtail" in wanted:
        works["longtail"] = long_tailed(args.longtail_requests, **LONGTAIL, seed=args.seed)
    gpus = len(visible_gpus()) if device.type == "cuda" else 0
    result = ResultFile(args, "scale", run_info(device, dtype, args.model) | dict(gpus_visible=gpus))
    for engines in engine_counts(args):
        args.engines = engines
        with policy_server(args, "dynamic", device, dtype) as (url, health):
            result.data.setdefault("servers", []).append(health)
            send_load(url, WARM_UP)
            for workload, requests in works.items():
                for _ in range(args.repeats):
                    load = send_load(url, requests, desc=f"{engines} engine(s) {workload}")
                    row = dict(system=f"{engines} engine{'s' * (engines > 1)}", workload=workload, engines=engines,
                               gpus=min(engines, gpus), requests=len(requests), **load.outcome())
                    row["output_tokens_per_s"] = row.get("metrics", {}).get("output_tokens_per_s")
                    print(f"{engines} engine(s) {workload}: {row['output_tokens_per_s']} tok/s, {row['failed']} "
                          "failed", flush=True)
                    result.add(row)
    result.data["speedups"] = speedups(result.data["results"])
    return result.finish()


def speedups(rows: list[dict]) -> list[dict]:
    """Each workload's best tokens/s with N engines over its best with one."""
    best: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["output_tokens_per_s"]:
            key = (r["workload"], r["engines"])
            best[key] = max(best.get(key, 0.0), r["output_tokens_per_s"])
    return [dict(workload=w, engines=n, speedup=tps / best[(w, 1)]) for (w, n), tps in sorted(best.items())
            if n > 1 and (w, 1) in best]
