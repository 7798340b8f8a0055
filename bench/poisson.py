"""`poisson`: Poisson arrivals at rising QPS over HTTP, one `./server.sh POLICY` per policy: TTFT, TPOT, ITL and
E2E (mean, p50, p90, p99), throughput and goodput at each rate.

Lengths come from a fixed seeded long-tailed (lognormal, ShareGPT-like) distribution, the same requests at every
rate and for every policy. Once a policy's median TTFT passes --saturation x the TTFT SLO its queue only grows
with the rate, so its higher rates are recorded as skipped instead of being waited out.
"""
import argparse

from bench import throughput
from bench.common import ResultFile, resolve, run_info
from bench.http_throughput import WARM_UP
from bench.server import add_server_arguments, policy_server, send_load
from bench.workloads import long_tailed, poisson_arrivals

CPU = dict(qps="1,2,4", requests=16, prompt_median=48, output_median=32, slo_ttft=2.0, slo_tpot=0.25)
FULL = dict(qps="2,4,8,16,32", requests=100, prompt_median=140, output_median=120, slo_ttft=1.0, slo_tpot=0.05)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p)
    p.add_argument("--policies", default="nobatch,static,dynamic")
    p.add_argument("--qps", help="comma list of offered request rates (cpu 1,2,4; full 2,4,8,16,32)")
    p.add_argument("--requests", type=int, help="requests per rate (cpu 16, full 100)")
    p.add_argument("--prompt-median", type=int, help="median prompt tokens (cpu 48, full 140)")
    p.add_argument("--output-median", type=int, help="median output tokens (cpu 32, full 120)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal shape: the length of the tail")
    p.add_argument("--slo-ttft", type=float, help="goodput SLO on TTFT, seconds (cpu 2, full 1)")
    p.add_argument("--slo-tpot", type=float, help="goodput SLO on TPOT, seconds (cpu 0.25, full 0.05)")
    p.add_argument("--saturation", type=float, default=5.0,
                   help="skip a policy's higher rates once its median TTFT passes this x the TTFT SLO")
    throughput.add_engine_arguments(p)


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, CPU, FULL)
    rates = [float(q) for q in args.qps.split(",")]
    requests = long_tailed(args.requests, args.prompt_median, args.output_median, args.sigma, context=1024,
                           seed=args.seed)
    result = ResultFile(args, "poisson", run_info(device, dtype, args.model))
    result.data["lengths"] = dict(prompt=[len(r.prompt) for r in requests], output=[r.num_tokens for r in requests])
    for policy in args.policies.split(","):
        try:
            with policy_server(args, policy, device, dtype) as (url, health):
                result.data["server"] = health
                send_load(url, WARM_UP)
                saturated_at = None
                for qps in rates:
                    if saturated_at is not None:
                        result.add(dict(policy=policy, qps=qps, skipped=f"saturated at {saturated_at} QPS"))
                        continue
                    load = send_load(url, poisson_arrivals(requests, qps, args.seed), desc=f"{policy} {qps} QPS")
                    result.data["streaming"] = load.streaming
                    row = dict(policy=policy, qps=qps, requests=len(requests),
                               **load.outcome(slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot))
                    result.add(row)
                    ttft = row["metrics"]["ttft_s"]["p50"] if "metrics" in row else float("inf")
                    print(f"{policy} {qps} QPS: TTFT p50 {ttft:.3f} s, {row['failed']} failed", flush=True)
                    if ttft > args.saturation * args.slo_ttft:
                        saturated_at = qps
        except Exception as e:  # a server that does not start is a finding; the other policies still run
            result.add(dict(policy=policy, qps=None, error=repr(e)[:1000]))
    return result.finish()
