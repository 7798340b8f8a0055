"""`throughput`: output tokens/s of our three policies and of the HF peers on the same all-at-once workloads,
in one process on one device, and the ratio ours / peer.

Workloads (bench/README.md): the seed burst (3-token prompts, outputs 5..145) and offline (prompt and output lengths
uniform). On the CPU the small "cpu burst" / "cpu offline" sizes. nobatch can be cut to the first requests of a
workload (--nobatch-requests): it runs one request at a time, so its tokens/s hardly depends on how many there
are, and the whole offline workload would take it most of an hour on a GPU.
"""
import argparse
from collections.abc import Callable

from bench import engine, peers
from bench.common import ResultFile, resolve, run_info
from bench.workloads import offline, seed_burst
from client.workload import Request
from telemetry.latency import summarize

CPU = dict(burst_requests=30, offline_requests=32, offline_min=32, offline_max=128, nobatch_requests=10,
           static_batch=16)
FULL = dict(burst_requests=100, offline_requests=256, offline_min=64, offline_max=512, nobatch_requests=8,
            static_batch=64)
PEERS = ("hf_cb", "hf_static")


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The flags `throughput` and `http` share: which workloads, their sizes, the engine's settings."""
    p.add_argument("--workloads", default="burst,offline", help="comma list of burst, offline")
    p.add_argument("--policies", default="nobatch,static,dynamic")
    p.add_argument("--requests", type=int, help="request count of every workload (overrides the two below)")
    add_size_arguments(p)
    p.add_argument("--nobatch-requests", type=int, help="run nobatch on the first N requests only (0: all; "
                                                        "cpu 10, full 8)")
    add_engine_arguments(p)


def add_size_arguments(p: argparse.ArgumentParser) -> None:
    """The sizes of the seed burst and offline."""
    p.add_argument("--burst-requests", type=int, help="seed burst size (cpu 30, full 100)")
    p.add_argument("--offline-requests", type=int, help="offline size (cpu 32, full 256)")
    p.add_argument("--offline-min", type=int, help="offline prompt/output length lower bound (cpu 32, full 64)")
    p.add_argument("--offline-max", type=int, help="offline prompt/output length upper bound (cpu 128, full 512)")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The server's engine settings, for the in-process engine and the server alike."""
    p.add_argument("--max-batch", type=int, help="the server's MAX_BATCH (default: the server's, 512 on a GPU and "
                                                 "128 on a CPU)")
    p.add_argument("--max-step-tokens", type=int, default=2048, help="the server's MAX_STEP_TOKENS")
    p.add_argument("--overlap-steps", choices=("on", "off"), default="on",
                   help="the server's OVERLAP_STEPS: on a GPU, launch each step while the one before runs (off: "
                        "one step at a time, for comparison)")


def overlap_setting(args: argparse.Namespace) -> str:
    """--overlap-steps as the server's OVERLAP_STEPS: on is the server's default, off reads each step at once."""
    return "auto" if args.overlap_steps == "on" else "false"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p)
    p.add_argument("--peers", default=",".join(PEERS), help="comma list of hf_cb, hf_static (empty: none)")
    p.add_argument("--static-batch", type=int, help="batch size of the HF generate peer (cpu 16, full 64)")
    p.add_argument("--repeats", type=int, default=1, help="run each of our rows this many times (the spread "
                                                          "between repeats is reported)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="also run each of our rows with BATCH_INVARIANT (rows ours-POLICY-invariant), and report "
                        "its cost: its tokens/s over the default mode's")


def workloads(args: argparse.Namespace) -> dict[str, list[Request]]:
    sizes = dict(burst=args.requests or args.burst_requests, offline=args.requests or args.offline_requests)
    build = dict(burst=lambda n: seed_burst(n, seed=args.seed),
                 offline=lambda n: offline(n, args.offline_min, args.offline_max, seed=args.seed))
    return {name: build[name](sizes[name]) for name in args.workloads.split(",")}


def policy_requests(args: argparse.Namespace, policy: str, requests: list[Request]) -> list[Request]:
    return requests[:args.nobatch_requests] if policy == "nobatch" and args.nobatch_requests else requests


def kv_blocks_for(works: dict[str, list[Request]], block_size: int = 16) -> int:
    """A KV pool that holds every request of the largest workload at full length: no preemption, and on a GPU
    the rest of the memory stays free for the peers."""
    return max(sum(-(-(len(r.prompt) + r.num_tokens) // block_size) for r in reqs) for reqs in works.values())


def ratios(rows: list[dict]) -> list[dict]:
    """ours / peer output tokens/s for every pair that ran the same workload."""
    done = [r for r in rows if "output_tokens_per_s" in r]
    return [dict(workload=o["workload"], ours=o["system"], peer=p["system"],
                 ratio=o["output_tokens_per_s"] / p["output_tokens_per_s"],
                 ours_requests=o["requests"], peer_requests=p["requests"])
            for o in done if o["system"].startswith("ours") for p in done
            if not p["system"].startswith("ours") and p["workload"] == o["workload"]]


def warm_runner(args: argparse.Namespace, device, dtype, num_blocks: int, batch_invariant: bool = False):
    """Our runner with a KV pool of num_blocks, warmed up (first-call costs stay out of the timings)."""
    runner = engine.build_runner(args.model, device, dtype, num_blocks=num_blocks, max_batch=args.max_batch,
                                 max_step_tokens=args.max_step_tokens, batch_invariant=batch_invariant)
    engine.warm_up(runner)
    return runner


def runner_and_peer(args: argparse.Namespace, device, dtype, num_blocks: int, peer: bool) -> tuple:
    """Our runner with a KV pool of num_blocks, and (if `peer`) HF's model of the same shape, both warmed up."""
    runner = warm_runner(args, device, dtype, num_blocks)
    hf = peers.hf_model(args.model, device, dtype) if peer else None
    if hf is not None:
        peers.warm_up(hf, device)
    return runner, hf


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, CPU, FULL)
    works = workloads(args)
    result = ResultFile(args, "throughput", run_info(device, dtype, args.model))
    wanted = [p for p in args.peers.split(",") if p]
    runner, hf = runner_and_peer(args, device, dtype, kv_blocks_for(works), bool(wanted))
    runners = {"": runner}
    if args.batch_invariant:
        runners["-invariant"] = warm_runner(args, device, dtype, kv_blocks_for(works), batch_invariant=True)
    for workload, requests in works.items():
        for policy in args.policies.split(","):
            reqs = policy_requests(args, policy, requests)
            for _ in range(args.repeats):
                for mode, mode_runner in runners.items():  # side by side, repeat after repeat
                    run(result, dict(system=f"ours-{policy}{mode}", workload=workload, requests=len(reqs)),
                        lambda: ours(mode_runner, policy, reqs, args, workload))
        if "hf_cb" in wanted:
            run(result, dict(system="hf-continuous", workload=workload, requests=len(requests)),
                lambda: peer_row(*peers.run_hf_continuous(hf, requests, device)))
        if "hf_static" in wanted:
            run(result, dict(system=f"hf-static{args.static_batch}", workload=workload, requests=len(requests)),
                lambda: peer_row(*peers.run_hf_static(hf, requests, args.static_batch, device)))
    result.data["ratios"] = ratios(result.data["results"])
    result.data["spread"] = spread(result.data["results"])
    if args.batch_invariant:
        result.data["batch_invariant_cost"] = invariant_cost(result.data["results"])
    print_table(result.data)
    return result.finish()


def run(result: ResultFile, row: dict, measure: Callable[[], dict]) -> None:
    """One row (`row`, and what `measure` gives); a system failing is a finding, recorded beside the others, not
    the end of the run."""
    try:
        row.update(measure())
    except Exception as e:
        row["error"] = repr(e)[:500]
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                   if not isinstance(v, dict)), flush=True)
    result.add(row)


def ours(runner, policy: str, requests: list[Request], args: argparse.Namespace, workload: str) -> dict:
    burst = engine.run_burst(runner, policy, requests, args.max_batch, args.max_step_tokens,
                             desc=f"{policy} {workload}", overlap_steps=overlap_setting(args))
    summary = summarize(burst.records)
    return dict(seconds=summary["duration_s"], output_tokens=summary["output_tokens"],
                output_tokens_per_s=summary["output_tokens_per_s"], steps=burst.steps,
                ms_per_step=summary["duration_s"] / burst.steps * 1e3, metrics=summary)


def invariant_cost(rows: list[dict]) -> list[dict]:
    """BATCH_INVARIANT's tokens/s over the default mode's, per policy and workload (means over the repeats)."""
    def mean(system: str, workload: str) -> float | None:
        v = [r["output_tokens_per_s"] for r in rows if (r["system"], r["workload"]) == (system, workload)
             and "output_tokens_per_s" in r]
        return sum(v) / len(v) if v else None

    out = []
    for system, workload in dict.fromkeys((r["system"], r["workload"]) for r in rows
                                          if r["system"].endswith("-invariant")):
        default, invariant = mean(system.removesuffix("-invariant"), workload), mean(system, workload)
        if default and invariant:
            out.append(dict(system=system, workload=workload, of_default=invariant / default))
    return out


def spread(rows: list[dict]) -> list[dict]:
    """(max - min) / max output tokens/s over the repeats of each of our systems on each workload."""
    speeds: dict[tuple, list[float]] = {}
    for r in rows:
        if r["system"].startswith("ours") and "output_tokens_per_s" in r:
            speeds.setdefault((r["system"], r["workload"]), []).append(r["output_tokens_per_s"])
    return [dict(system=system, workload=workload, repeats=len(v), min=min(v), max=max(v),
                 spread=(max(v) - min(v)) / max(v)) for (system, workload), v in speeds.items() if len(v) > 1]


def peer_row(seconds: float, output_tokens: int) -> dict:
    return dict(seconds=seconds, output_tokens=output_tokens, output_tokens_per_s=output_tokens / seconds)


def print_table(data: dict) -> None:
    print(f"\n{'system':<20} {'workload':<9} {'requests':>8} {'seconds':>9} {'tok/s':>9}")
    for r in data["results"]:
        speed = f"{r['seconds']:9.2f} {r['output_tokens_per_s']:9.1f}" if "error" not in r else r["error"][:60]
        print(f"{r['system']:<20} {r['workload']:<9} {r['requests']:>8} {speed}")
    for r in data["ratios"]:
        print(f"{r['workload']:<9} {r['ours']:<16} / {r['peer']:<16} = {r['ratio']:.2f}")
    for r in data.get("batch_invariant_cost", []):
        print(f"{r['workload']:<9} {r['system']:<16} at {r['of_default']:.0%} of the default mode's tokens/s")
    for r in data.get("spread", []):
        print(f"{r['workload']:<9} {r['system']:<16} {r['repeats']} repeats: {r['min']:.0f}..{r['max']:.0f} tok/s, "
              f"spread {r['spread']:.1%}")
