"""`http`: the throughput workloads (seed burst, offline) over HTTP, one `./server.sh POLICY` per policy, all
requests sent at once by the async client. Beside `throughput` it shows what the HTTP layer costs, and where:
each row also says, from the server's /timeline, when half of the requests and the last reached the server and
how the engine's steps went (how many, how long, and the gaps between them, where the engine process sends
results and takes requests; in-process, with nothing but the step's own bookkeeping between steps, they averaged
0.1-0.2 ms on an H200)."""
import argparse
import itertools
import time

import numpy as np
import requests as http

from bench import throughput
from bench.common import ResultFile, resolve, run_info
from bench.server import add_server_arguments, policy_server, send_load, stream_intervals
from client.load import Load
from client.workload import Request

WARM_UP = [Request(list(range(1, 33)), 4), Request([1, 2, 3], 8)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p)
    throughput.add_workload_arguments(p)
    p.add_argument("--repeats", type=int, default=1, help="run each workload this many times on each server (a "
                                                          "burst is a third of a second: its rows vary)")


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, throughput.CPU, throughput.FULL)
    works = throughput.workloads(args)
    result = ResultFile(args, "http", run_info(device, dtype, args.model))
    for policy, interval in itertools.product(args.policies.split(","), stream_intervals(args)):
        server = dict(policy=policy) if interval is None else dict(policy=policy, stream_interval_ms=interval)
        try:
            with policy_server(args, policy, device, dtype, interval) as (url, health):
                result.data["server"] = health
                send_load(url, WARM_UP)
                for workload, requests in works.items():
                    requests = throughput.policy_requests(args, policy, requests)
                    for _ in range(args.repeats):
                        row = dict(**server, workload=workload, requests=len(requests),
                                   **measured_load(url, health, requests, f"{policy} {workload}"))
                        print(f"{server} {workload}: {row.get('metrics', {}).get('output_tokens_per_s')} tok/s, "
                              f"{row.get('tokens_per_event')} tokens per event, {row['failed']} failed; "
                              f"{row.get('engine')}", flush=True)
                        result.add(row)
        except Exception as e:  # a server that does not start is a finding; the other policies still run
            result.add(dict(**server, workload=args.workloads, requests=0, error=repr(e)[:1000]))
    return result.finish()


def measured_load(url: str, health: dict, requests: list[Request], desc: str) -> dict:
    """The requests sent to the server at `url` (its /health in `health`): the load's outcome, and with one engine
    (steps are numbered per engine) the run as the engine saw it (`engine_side`)."""
    since = timeline(url)["step"]  # the step before this run (read before it starts)
    load = send_load(url, requests, desc=desc)
    row = load.outcome()
    if load.answered and health["engines"] == 1:
        row["engine"] = engine_side(timeline(url, since), load)
    return row


def timeline(url: str, since: int | None = None) -> dict:
    """The server's schedule after step `since`; with none, all that it keeps (and its current step)."""
    return http.get(f"{url}/timeline", params={} if since is None else {"since": since}, timeout=30).json()


def engine_side(snapshot: dict, load: Load) -> dict:
    """The run as the engine saw it (a /timeline snapshot of its steps and requests): when half of the requests,
    and the last, reached the server after the client's first send; the engine's steps from that send on and the
    gaps between them (the snapshot also holds the step of the client's probe for streaming, made before)."""
    origin = snapshot["origin_unix"] - (time.time() - time.perf_counter())  # on this process's perf_counter
    first_send = min(r.arrival for r in load.records)
    arrivals = np.array([origin + r["arrival"] - first_send for r in snapshot["requests"]])
    arrivals = arrivals[arrivals > -0.001]  # this run's requests
    steps = [s for s in snapshot["steps"] if origin + s["start"] >= first_send]
    ms = lambda x: round(float(x) * 1e3, 2)
    if not steps:  # a tiny run whose steps all began within the two clocks' offset (~1 ms) of its first send
        return dict(arrival_p50_ms=ms(np.percentile(arrivals, 50)), last_arrival_ms=ms(arrivals.max()), steps=0)
    starts, durations = (np.array([s[k] for s in steps]) for k in ("start", "duration"))
    gaps = starts[1:] - starts[:-1] - durations[:-1] if len(starts) > 1 else np.zeros(1)  # one step: no gap
    return dict(arrival_p50_ms=ms(np.percentile(arrivals, 50)), last_arrival_ms=ms(arrivals.max()),
                steps=len(starts),
                ms_per_step=ms((starts[-1] + durations[-1] - starts[0]) / len(starts)),  # steps and their gaps
                step_ms=ms(durations.mean()), gap_ms_p50=ms(np.percentile(gaps, 50)),
                gap_ms_p99=ms(np.percentile(gaps, 99)), gap_ms_max=ms(gaps.max()))
