"""`poisson`: Poisson arrivals at rising QPS over HTTP, one `./server.sh POLICY` per policy: TTFT, TPOT, ITL and
E2E (mean, p50, p90, p99), throughput and goodput at each rate, and the highest rate whose p99 TTFT and p99 TPOT
stay within --p99-ttft and --p99-tpot (`max_rate`: the offered rate and the requests/s achieved there). Each row
also has the rate at which its requests did arrive (`arrival_rate`: the drawn arrivals', a little off the nominal).

Lengths come from a fixed seeded long-tailed (lognormal, ShareGPT-like) distribution, the same requests at every
rate and for every policy. Once a policy's median TTFT passes --saturation x the TTFT SLO its queue only grows
with the rate, so its higher rates are recorded as skipped instead of being waited out.
"""
import argparse
import itertools

from bench import throughput
from bench.common import ResultFile, resolve, run_info
from bench.http_throughput import WARM_UP
from bench.server import add_server_arguments, policy_server, send_load, stream_intervals
from bench.workloads import long_tailed, poisson_arrivals

CPU = dict(qps="1,2,4", requests=16, prompt_median=48, output_median=32, slo_ttft=2.0, slo_tpot=0.25,
           p99_ttft=4.0, p99_tpot=0.5)
FULL = dict(qps="50,100,150,200,250,300", requests=1000, prompt_median=180, output_median=160, slo_ttft=1.0,
            slo_tpot=0.05, p99_ttft=0.1, p99_tpot=0.025)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p)
    p.add_argument("--policies", default="nobatch,static,dynamic")
    p.add_argument("--qps", help="comma list of offered request rates (cpu 1,2,4; full 50,100,...,300)")
    p.add_argument("--requests", type=int, help="requests per rate (cpu 16, full 1000)")
    p.add_argument("--prompt-median", type=int, help="median prompt tokens (cpu 48, full 180)")
    p.add_argument("--output-median", type=int, help="median output tokens (cpu 32, full 160)")
    p.add_argument("--sigma", type=float, default=0.9, help="lognormal shape: the length of the tail")
    p.add_argument("--slo-ttft", type=float, help="goodput SLO on TTFT, seconds (cpu 2, full 1)")
    p.add_argument("--slo-tpot", type=float, help="goodput SLO on TPOT, seconds (cpu 0.25, full 0.05)")
    p.add_argument("--p99-ttft", type=float, help="max_rate's bound on p99 TTFT, seconds (cpu 4, full 0.1)")
    p.add_argument("--p99-tpot", type=float, help="max_rate's bound on p99 TPOT, seconds (cpu 0.5, full 0.025)")
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
    result.data["max_rate"] = []
    for policy, interval in itertools.product(args.policies.split(","), stream_intervals(args)):
        server = dict(policy=policy) if interval is None else dict(policy=policy, stream_interval_ms=interval)
        try:
            with policy_server(args, policy, device, dtype, interval) as (url, health):
                result.data["server"] = health
                send_load(url, WARM_UP)
                saturated_at, rows = None, []
                for qps in rates:
                    if saturated_at is not None:
                        result.add(dict(**server, qps=qps, skipped=f"saturated at {saturated_at} QPS"))
                        continue
                    arriving = poisson_arrivals(requests, qps, args.seed)
                    load = send_load(url, arriving, desc=f"{policy} {qps} QPS")
                    result.data["streaming"] = load.streaming
                    row = dict(**server, qps=qps, requests=len(requests),
                               arrival_rate=(len(arriving) - 1) / arriving[-1].arrival,
                               **load.outcome(slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot))
                    row["within_p99_slo"] = within_p99_slo(row, args.p99_ttft, args.p99_tpot)
                    rows.append(row)
                    result.add(row)
                    ttft = row["metrics"]["ttft_s"]["p50"] if "metrics" in row else float("inf")
                    print(f"{server} {qps} QPS: TTFT p50 {ttft:.3f} s, p99 SLO met: {row['within_p99_slo']}, "
                          f"{row.get('tokens_per_event')} tokens per event, {row['failed']} failed", flush=True)
                    if ttft > args.saturation * args.slo_ttft:
                        saturated_at = qps
                result.data["max_rate"].append(dict(**server, **max_rate(rows)))
        except Exception as e:  # a server that does not start is a finding; the other policies still run
            result.add(dict(**server, qps=None, error=repr(e)[:1000]))
    return result.finish()


def within_p99_slo(row: dict, p99_ttft: float, p99_tpot: float) -> bool:
    """Every request answered, and p99 TTFT and p99 TPOT within their bounds."""
    m = row.get("metrics")
    return bool(m) and not row["failed"] and m["ttft_s"]["p99"] <= p99_ttft and (
        m["tpot_s"]["p99"] is None or m["tpot_s"]["p99"] <= p99_tpot)


def max_rate(rows: list[dict]) -> dict:
    """The highest offered rate within the p99 SLO, below the first rate that is not (a rate past it that
    happens to pass again does not count), and the requests/s achieved there (vLLM's request throughput:
    requests over first arrival to last finish). A run is a fixed number of requests, so past the rate the server
    can keep up with, a queue builds only while they arrive: the latencies can stay within the SLO while the
    achieved rate stays below the offered one, the rest of the work done after the last arrival."""
    best = None
    for row in rows:
        if not row["within_p99_slo"]:
            break
        best = row
    if best is None:
        return dict(offered_qps=None, achieved_requests_per_s=None)
    return dict(offered_qps=best["qps"], achieved_requests_per_s=best["metrics"]["requests_per_s"])
