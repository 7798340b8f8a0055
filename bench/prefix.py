"""`prefix`: what prefix caching gains, in-process: our dynamic engine with the prefix cache on and off on one runner
(`block_manager.prefix_caching` flipped between runs, the cache cleared before each so every run starts cold),
beside HF continuous batching with its block sharing on.

Workloads (bench/README.md): `shared` (one system prompt before every request's own tokens, all at t=0), `chat`
(closed-loop conversations: each turn is sent when the turn before has finished, its prompt being that turn's
prompt and answer and the user's new tokens), and `burst` / `offline` with throughput's sizes, which share nothing
and show what the cache costs when it cannot help. Throughput counts prompt and output tokens (a cached prompt
token is work the engine did not have to do). HF has no closed-loop API, so its peer runs `shared` only.
"""
import argparse
from collections.abc import Callable

from tqdm import tqdm

from bench import engine, peers, roofline, throughput
from bench.common import ResultFile, resolve, run_info
from bench.throughput import add_engine_arguments, add_size_arguments, overlap_setting, run, runner_and_peer
from bench.workloads import Conversation, chat, offline, seed_burst, shared_prefix
from client.workload import Request
from engine.runner import kv_bytes_per_token
from telemetry.latency import summarize

CPU = dict(shared_requests=24, shared_prefix=96, shared_unique=16, shared_output=16, chat_conversations=8,
           chat_turns=4, chat_opening=64, chat_user=16, chat_output=16, **throughput.CPU)
FULL = dict(shared_requests=256, shared_prefix=600, shared_unique=50, shared_output=64, chat_conversations=64,
            chat_turns=6, chat_opening=200, chat_user=40, chat_output=64, **throughput.FULL)
Work = list[Request] | list[Conversation]
Follow = Callable[[int, object], Request | None]  # (chain, finished Inference) -> the chain's next request


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", default="shared,chat,burst,offline",
                   help="comma list of shared, chat, burst, offline")
    p.add_argument("--shared-requests", type=int, help="shared: requests (cpu 24, full 256)")
    p.add_argument("--shared-prefix", type=int, help="shared: tokens of the system prompt (cpu 96, full 600)")
    p.add_argument("--shared-unique", type=int, help="shared: each request's own tokens after it (cpu 16, full 50)")
    p.add_argument("--shared-output", type=int, help="shared: output tokens per request (cpu 16, full 64)")
    p.add_argument("--chat-conversations", type=int, help="chat: conversations (cpu 8, full 64)")
    p.add_argument("--chat-turns", type=int, help="chat: turns per conversation (cpu 4, full 6)")
    p.add_argument("--chat-opening", type=int, help="chat: tokens of turn 1's prompt (cpu 64, full 200)")
    p.add_argument("--chat-user", type=int, help="chat: the user's new tokens per later turn (cpu 16, full 40)")
    p.add_argument("--chat-output", type=int, help="chat: output tokens per turn (cpu 16, full 64)")
    add_size_arguments(p)
    add_engine_arguments(p)
    p.add_argument("--peers", default="hf_cb", help="hf_cb (HF continuous batching, block sharing on, on shared) "
                                                   "or empty: none")
    p.add_argument("--repeats", type=int, default=1, help="run each of our rows this many times")


def workloads(args: argparse.Namespace) -> dict[str, Work]:
    build = dict(
        shared=lambda: shared_prefix(args.shared_requests, args.shared_prefix, args.shared_unique, args.shared_output,
                                     seed=args.seed),
        chat=lambda: chat(args.chat_conversations, args.chat_turns, args.chat_opening, args.chat_user,
                          args.chat_output, seed=args.seed),
        burst=lambda: seed_burst(args.burst_requests, seed=args.seed),
        offline=lambda: offline(args.offline_requests, args.offline_min, args.offline_max, seed=args.seed))
    return {name: build[name]() for name in args.workloads.split(",")}


def kv_blocks_for(works: dict[str, Work], block_size: int = 16) -> int:
    """A KV pool that holds the largest workload at full length with nothing shared (a conversation holds one turn
    at a time, its last the longest): no preemption with the cache off either, so on and off differ only by it."""
    def blocks(tokens: int) -> int:
        return -(-tokens // block_size)
    return max(sum(blocks(w.longest) if isinstance(w, Conversation) else blocks(len(w.prompt) + w.num_tokens)
                   for w in work) for work in works.values())


def main(args: argparse.Namespace) -> str:
    device, dtype = resolve(args, CPU, FULL)
    works = workloads(args)
    result = ResultFile(args, "prefix", run_info(device, dtype, args.model))
    runner, hf = runner_and_peer(args, device, dtype, kv_blocks_for(works), "hf_cb" in args.peers.split(","))
    limits = dict(copy_GBps=roofline.copy_bandwidth(device) / 1e9,
                  matmul_peak_tflops=roofline.matmul_throughput(device, dtype, runner.model.config.n_embd) / 1e12)
    result.data.update(limits)
    for workload, work in works.items():
        n = sum(c.turns for c in work) if workload == "chat" else len(work)
        for i in range(args.repeats):
            for caching in (True, False) if i % 2 == 0 else (False, True):  # neither always first: no drift bias
                run(result, dict(system="ours-dynamic", workload=workload, prefix_caching=caching, requests=n),
                    lambda: ours(runner, work, caching, args, workload, n, limits))
        if hf is not None and workload == "shared":
            run(result, dict(system="hf-continuous", workload=workload, prefix_caching=True, requests=n),
                lambda: hf_row(work, *peers.run_hf_continuous(hf, work, device, block_sharing=True,
                                                              block_size=runner.block_manager.block_size)))
    result.data["ratios"] = ratios(result.data["results"])
    print_table(result.data)
    return result.finish()


def ours(runner, work: Work, caching: bool, args: argparse.Namespace, workload: str, n: int, limits: dict) -> dict:
    """One cold run: the cache switched on or off and emptied, then the workload to its last token; beside it the
    floor of the schedule that ran (bench/README.md, "Bounds"; a block that several sequences of a step hold is
    read once)."""
    blocks = runner.block_manager
    blocks.prefix_caching = caching
    blocks.clear_cache()
    first, follow = chat_turns(work) if workload == "chat" else (work, lambda chain, inf: None)
    tables: list = []
    with engine.recorded_steps(runner, tables) as launched:
        finished, steps = drive(runner, first, follow, n, args, f"{workload} caching {'on' if caching else 'off'}")
    weights, kv_per_token = roofline.weight_bytes(runner.model), kv_bytes_per_token(runner.model, runner.dtype)
    block_size = runner.block_manager.block_size
    bound_s = sum(roofline.step_floor_s(runner.model.config, step, weights, kv_per_token, limits["copy_GBps"] * 1e9,
                                        limits["matmul_peak_tflops"] * 1e12,
                                        roofline.distinct_kv_tokens(step, table, block_size))
                  for step, table in zip(launched, tables))
    summary = summarize([engine.record(inf) for inf in finished])
    cached = sum(inf.cached_tokens for inf in finished)
    prompt, output = summary["prompt_tokens"], summary["output_tokens"]
    return dict(seconds=summary["duration_s"], prompt_tokens=prompt, output_tokens=output,
                total_tokens_per_s=(prompt + output) / summary["duration_s"],
                output_tokens_per_s=summary["output_tokens_per_s"], ttft_p50_s=summary["ttft_s"]["p50"],
                ttft_p99_s=summary["ttft_s"]["p99"], cached_tokens=cached, hit_rate=cached / prompt, steps=steps,
                bound_s=bound_s, of_bound=bound_s / summary["duration_s"], metrics=summary)


def drive(runner, first: list[Request], follow: Follow, total: int, args: argparse.Namespace,
          desc: str) -> tuple[list, int]:
    """Requests `first` at t=0, each starting a chain: when a request of chain k finishes, follow(k, its Inference)
    makes the chain's next request (None: the chain is done), enqueued from the engine's on_finish callback (inside
    step(), on this thread) so that it arrives at the next step. The engine steps here until nothing is left;
    returns the `total` finished Inferences and the steps."""
    manager = engine.make_manager(runner, "dynamic", args.max_batch, args.max_step_tokens, overlap_setting(args))
    finished, chain_of = [], {}

    def send(chain: int, request: Request) -> None:
        chain_of[manager.enqueue(engine.make_inference(request)).id] = chain

    def on_finish(inf) -> None:
        finished.append(inf)
        bar.update()
        chain = chain_of.pop(inf.id)
        request = follow(chain, inf)
        if request is not None:
            send(chain, request)

    with tqdm(total=total, desc=desc, unit="req", leave=False) as bar:
        manager.on_finish.append(on_finish)
        for chain, request in enumerate(first):
            send(chain, request)
        while manager.step():
            pass
    if len(finished) != total:  # a follow-up that failed is only logged by the engine (on_finish callbacks)
        raise RuntimeError(f"{len(finished)} of {total} requests finished")
    return finished, manager.steps


def chat_turns(conversations: list[Conversation]) -> tuple[list[Request], Follow]:
    """Every conversation's first turn, and the follow-up that makes a finished turn's next (None after the last):
    its prompt, its answer's generated ids and the user's next tokens."""
    turns_done = [0] * len(conversations)

    def follow(k: int, inf) -> Request | None:
        c, i = conversations[k], turns_done[k]
        turns_done[k] += 1
        if i == len(c.user_turns):
            return None
        return Request(inf.prompt_ids + inf.output_ids + c.user_turns[i], c.num_tokens)

    return [Request(c.opening, c.num_tokens) for c in conversations], follow


def hf_row(requests: list[Request], seconds: float, output_tokens: int) -> dict:
    prompt = sum(len(r.prompt) for r in requests)
    return dict(seconds=seconds, prompt_tokens=prompt, output_tokens=output_tokens,
                total_tokens_per_s=(prompt + output_tokens) / seconds, output_tokens_per_s=output_tokens / seconds)


def ratios(rows: list[dict]) -> list[dict]:
    """Per workload, our caching-on runs over the caching-off runs (means over the repeats): total tokens/s on / off,
    and TTFT p50 off / on, so that both are speed-ups where above 1; and the floors' (bound_s off / on): the most
    the cache could gain on those schedules."""
    ours = [r for r in rows if r["system"] == "ours-dynamic" and "error" not in r]

    def mean(workload: str, caching: bool, key: str) -> float | None:
        values = [r[key] for r in ours if (r["workload"], r["prefix_caching"]) == (workload, caching)]
        return sum(values) / len(values) if values else None

    out = []
    for w in dict.fromkeys(r["workload"] for r in ours):
        speed, ttft, floor = [[mean(w, caching, key) for caching in (True, False)]
                              for key in ("total_tokens_per_s", "ttft_p50_s", "bound_s")]
        if None not in speed + ttft + floor:
            out.append(dict(workload=w, total_tokens_per_s=speed[0] / speed[1], ttft_p50=ttft[1] / ttft[0],
                            bound=floor[1] / floor[0]))
    return out


def print_table(data: dict) -> None:
    print(f"\n{'system':<15} {'workload':<9} {'caching':>7} {'requests':>8} {'seconds':>8} {'tok/s':>8} "
          f"{'out tok/s':>9} {'TTFT p50':>9} {'hit rate':>8}")
    for r in data["results"]:
        figures = r["error"][:60] if "error" in r else " ".join(
            "–".rjust(width) if r.get(key) is None else f"{r[key]:{width}{form}}" for key, width, form in
            (("seconds", 8, ".2f"), ("total_tokens_per_s", 8, ".1f"), ("output_tokens_per_s", 9, ".1f"),
             ("ttft_p50_s", 9, ".3f"), ("hit_rate", 8, ".1%")))
        print(f"{r['system']:<15} {r['workload']:<9} {'on' if r['prefix_caching'] else 'off':>7} {r['requests']:>8} "
              f"{figures}")
    for r in data["ratios"]:
        print(f"{r['workload']:<9} caching on / off: {r['total_tokens_per_s']:.2f}x tokens/s (the floors: "
              f"{r['bound']:.2f}x), TTFT p50 {r['ttft_p50']:.2f}x faster")
