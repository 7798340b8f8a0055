"""`http`: the throughput workloads (seed burst, offline) over HTTP, one `./server.sh POLICY` per policy, all
requests sent at once by the async client. Beside `throughput` it shows what the HTTP layer costs."""
import argparse

from bench import throughput
from bench.common import ResultFile, resolve, run_info
from bench.http_client import run_load
from bench.server import policy_server
from bench.workloads import Request

WARM_UP = [Request(list(range(1, 33)), 4), Request([1, 2, 3], 8)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    throughput.add_workload_arguments(p)
    p.add_argument("--repeats", type=int, default=1, help="run each workload this many times on each server (a "
                                                          "burst is a third of a second: its rows vary)")


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, throughput.CPU, throughput.FULL)
    works = throughput.workloads(args)
    result = ResultFile(args, "http", run_info(device, dtype, args.model))
    for policy in args.policies.split(","):
        try:
            with policy_server(args, policy, device, dtype) as (url, health):
                result.data["server"] = health
                run_load(url, WARM_UP)
                for workload, requests in works.items():
                    requests = throughput.policy_requests(args, policy, requests)
                    for _ in range(args.repeats):
                        load = run_load(url, requests, desc=f"{policy} {workload}")
                        row = dict(policy=policy, workload=workload, requests=len(requests), **load.outcome())
                        print(f"{policy} {workload}: {row.get('metrics', {}).get('output_tokens_per_s')} tok/s, "
                              f"{row['failed']} failed", flush=True)
                        result.add(row)
        except Exception as e:  # a server that does not start is a finding; the other policies still run
            result.add(dict(policy=policy, workload=args.workloads, requests=0, error=repr(e)[:1000]))
    return result.finish()
