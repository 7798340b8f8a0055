"""`report`: results.md (one table per benchmark) and the plots, redrawn from the JSON files of a directory.

Every sub-command refreshes its directory when it finishes; run this by hand after copying results from a
machine without matplotlib, or after editing a table's layout. A hand-written `notes.md` in the directory (what
the numbers mean, what disturbed them) is placed after the heading.
"""
import argparse
import glob
import json
import os
from pathlib import Path

from bench import plots

ORDER = ("throughput", "http", "scale", "decode", "prefill", "longtail", "poisson", "interference", "timeline-overhead",
         "prefix")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the directory holding the benchmarks' JSON files")


def main(args: argparse.Namespace) -> str:
    return refresh(args.out, redraw=ORDER)


def refresh(out: str, redraw: tuple[str, ...]) -> str:
    """Rewrite results.md from every result file in `out`, and draw the plots of the benchmarks named."""
    results = {}
    for path in glob.glob(os.path.join(out, "*.json")):
        with open(path) as f:
            data = json.load(f)
        if data.get("benchmark") in ORDER:
            results[data["benchmark"]] = data
    sections = []
    for name in (n for n in ORDER if n in results):
        data = results[name]
        if name in redraw:
            plots.draw(data, os.path.join(out, f"{name}.png"))
        sections.append(f"## {name}\n\n{describe(data['info'])}\n\n{TABLES[name](data)}\n\n![{name}]({name}.png)\n")
    notes_file = Path(out, "notes.md")
    notes = notes_file.read_text().strip() + "\n\n" if notes_file.exists() else ""
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write("# Benchmark results\n\nWritten by `python -m bench`; workloads and metrics as in bench/README.md. "
                "Throughput is output tokens/s over wall-clock time (first arrival to last finish).\n\n")
        f.write(notes + "\n".join(sections))
    return path


def describe(info: dict) -> str:
    load = f"{info['load_avg_start']:.1f} → {info.get('load_avg_end', float('nan')):.1f}"
    return (f"{info['model']} ({info['weights']} weights), {info['dtype']}, {info['device']}, torch {info['torch']}, "
            f"commit `{info['git_commit'][:12]}`, {info['date']}; {info['cpus']} CPUs, load average {load}")


def fmt(x, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if x is None else f"{x * scale:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def throughput_table(data: dict) -> str:
    peers = sorted({r["peer"] for r in data.get("ratios", [])})
    ratio = {(r["workload"], r["ours"], r["peer"]): r["ratio"] for r in data.get("ratios", [])}
    rows = []
    for r in data["results"]:
        speed = ([str(r["output_tokens"]), fmt(r["seconds"], digits=2), fmt(r["output_tokens_per_s"])]
                 if "error" not in r else ["–", "–", "failed: " + r["error"][:80]])
        rows.append([r["workload"], r["system"], str(r["requests"])] + speed
                    + [str(r.get("steps", "–")), fmt(r.get("ms_per_step"), digits=2)]
                    + [fmt(ratio.get((r["workload"], r["system"], p)), digits=2) for p in peers])
    return table(["workload", "system", "requests", "output tokens", "seconds", "tok/s", "steps", "ms/step"]
                 + [f"ours / {p}" for p in peers], rows)


def http_table(data: dict) -> str:
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([r["workload"], r["policy"], str(r["requests"]), "failed: " + r["error"][:80]] + ["–"] * 9)
            continue
        m, engine = r["metrics"], r.get("engine", {})
        streamed = "no" if not r["streaming"] else (f"{fmt(r.get('tokens_per_event'), digits=2)} tokens/event"
                                                    + (f", {r['stream_interval_ms']:g} ms" if "stream_interval_ms" in r
                                                       else ""))
        rows.append([r["workload"], r["policy"], str(r["requests"]), fmt(m["output_tokens_per_s"]),
                     fmt(m["ttft_s"]["p50"], 1e3, 0), fmt(m["ttft_s"]["p99"], 1e3, 0), fmt(m["e2e_s"]["p99"], digits=2),
                     streamed, fmt(engine.get("arrival_p50_ms"), digits=0),
                     fmt(engine.get("last_arrival_ms"), digits=0),
                     str(engine.get("steps", "–")), fmt(engine.get("ms_per_step"), digits=2),
                     fmt(engine.get("gap_ms_p99"), digits=2)])
    return table(["workload", "policy", "requests", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "E2E p99 s", "streamed",
                  "half in by ms", "all in by ms", "steps", "ms/step", "step gap p99 ms"], rows)


def decode_table(data: dict) -> str:
    rows = []
    for r in data["results"]:
        ms = [fmt(r.get(k), digits=2) for k in ("step_ms", "forward_ms", "hf_step_ms")]
        rows.append([str(r["batch"]), str(r["ctx"]), *ms, fmt(r.get("ours_vs_hf"), digits=2),
                     fmt(r["roofline_ms"], digits=2), fmt(r.get("of_roofline"), 100, 0) + "%",
                     fmt(r.get("tok_per_s"), digits=0), fmt(r.get("ideal_graph_ms"), digits=2),
                     fmt(r.get("ideal_eager_ms"), digits=2)])
    return (f"copy bandwidth {data['copy_GBps']:.1f} GB/s, weights {data['weight_GB']:.3f} GB, "
            f"KV {data['kv_bytes_per_token'] / 1024:.0f} KiB per token. ours / HF is the speed ratio (HF ms / our ms); "
            "of roofline is roofline ms / our step ms.\n\n"
            + table(["batch", "ctx", "our step ms", "our forward ms", "HF step ms", "ours / HF", "roofline ms",
                     "of roofline", "our tok/s", "ideal graph ms", "ideal eager ms"], rows))


def prefill_table(data: dict) -> str:
    rows = []
    for r in data["results"]:
        head = [str(r["prompt_tokens"]), str(r["requests"]), str(r["max_batch"]), str(r["max_step_tokens"])]
        if "error" in r:
            rows.append(head + ["failed: " + r["error"][:80]] + ["–"] * 5)
            continue
        rows.append(head + [fmt(r["seconds"], digits=3), fmt(r["tokens_per_s"], digits=0), fmt(r["tflops"], digits=2),
                            fmt(r["of_matmul_peak"], 100, 0) + "%", str(r["steps"]), fmt(r["ms_per_step"], digits=2)])
    return (f"matmul peak {data['matmul_peak_tflops']:.2f} TFLOP/s (measured in the same run); prompt tokens/s over "
            "wall-clock, FLOPs as bench/README.md's Bounds count them.\n\n"
            + table(["prompt tokens", "requests", "MAX_BATCH", "MAX_STEP_TOKENS", "seconds", "prompt tok/s", "TFLOP/s",
                     "of matmul peak", "steps", "ms/step"], rows))


def longtail_table(data: dict) -> str:
    rows = []
    for r in data["results"]:
        head = [plots.longtail_run(r), str(r["requests"])]
        if "error" in r:
            rows.append(head + ["failed: " + r["error"][:80]] + ["–"] * 5)
            continue
        steps = r.get("engine", {}) if r["over_http"] else r  # over HTTP, the server's /timeline
        rows.append(head + [fmt(r["output_tokens_per_s"]), fmt(r["bound_tokens_per_s"]),
                            fmt(r["of_bound"], 100, 0) + "%", str(steps.get("steps", "–")),
                            fmt(steps.get("ms_per_step"), digits=2), fmt(r.get("bound_ms_per_step"), digits=2)])
    return (f"bound: the in-process run's schedule, each step at the larger of its weights and K/V read at "
            f"{data['copy_GBps']:.1f} GB/s and its FLOPs at {data['matmul_peak_tflops']:.2f} TFLOP/s (both measured "
            "in the same run; bench/README.md, Bounds); steps over HTTP from the server's /timeline.\n\n"
            + table(["run", "requests", "output tok/s", "bound tok/s", "of bound", "steps", "ms/step",
                     "floor ms/step"], rows))


def scale_table(data: dict) -> str:
    rows = [[r["workload"], str(r["engines"]), str(r["gpus"]), str(r["requests"]), fmt(r["output_tokens_per_s"]),
             str(r["failed"])] for r in data["results"]]
    speedups = "; ".join(f"{s['workload']} {s['engines']} engines {s['speedup']:.2f}×" for s in data["speedups"])
    return (f"speed-up over one engine: {speedups or '–'}\n\n"
            + table(["workload", "engines", "GPUs", "requests", "tok/s", "failed"], rows))


def poisson_table(data: dict) -> str:
    rows = []
    for r in data["results"]:
        server = r["policy"] + (f" {r['stream_interval_ms']:g} ms" if "stream_interval_ms" in r else "")
        if "metrics" not in r:
            why = r.get("error") or r.get("skipped", "")
            rows.append([server, fmt(r["qps"], digits=2), why[:80]] + ["–"] * 9)
            continue
        m = r["metrics"]
        within = {True: "yes", False: "no"}.get(r.get("within_p99_slo"), "–")
        rows.append([server, fmt(r["qps"], digits=2), fmt(m["requests_per_s"], digits=2),
                     fmt(m["output_tokens_per_s"]), fmt(m["goodput_requests_per_s"], digits=2),
                     fmt(m["ttft_s"]["p50"], 1e3, 0), fmt(m["ttft_s"]["p99"], 1e3, 0), fmt(m["tpot_s"]["p99"], 1e3, 0),
                     fmt(m["itl_s"]["p99"], 1e3, 0), fmt(m["e2e_s"]["p99"], digits=2), within,
                     fmt(r.get("tokens_per_event"), digits=2)])
    c = data["config"]
    text = (f"goodput SLO: TTFT ≤ {c['slo_ttft']} s and TPOT ≤ {c['slo_tpot'] * 1e3:.0f} ms; "
            f"streamed: {'yes' if data.get('streaming') else 'no (no ITL)'}\n\n")
    for best in data.get("max_rate", []):
        if "p99_ttft" in c:
            text += (f"highest offered rate with p99 TTFT ≤ {c['p99_ttft'] * 1e3:g} ms and p99 TPOT ≤ "
                     f"{c['p99_tpot'] * 1e3:g} ms ({best['policy']}"
                     + (f", STREAM_INTERVAL_MS {best['stream_interval_ms']:g}" if "stream_interval_ms" in best else "")
                     + f"): {fmt(best['offered_qps'], digits=0)} requests/s "
                     f"offered, {fmt(best.get('achieved_requests_per_s'), digits=1)} achieved\n\n")
    return text + table(["policy", "QPS", "req/s", "tok/s", "goodput req/s", "TTFT p50 ms", "TTFT p99 ms",
                         "TPOT p99 ms", "ITL p99 ms", "E2E p99 s", "p99 SLO met", "tokens/event"], rows)


def interference_table(data: dict) -> str:
    rows = []
    for r in data["results"]:
        itl, ttft = r["decode_itl_s"], r["long_prompt_ttft_s"]
        rows.append([r["prefill"], str(r["max_step_tokens"]), fmt(itl["mean"], 1e3), fmt(itl["p50"], 1e3),
                     fmt(itl["p90"], 1e3), fmt(itl["p99"], 1e3), fmt(r["decode_itl_max_s"], 1e3),
                     fmt(ttft["p50"], 1e3, 0), fmt(r["decode_tokens_per_s"])])
    return table(["prefill", "MAX_STEP_TOKENS", "ITL mean ms", "ITL p50 ms", "ITL p90 ms", "ITL p99 ms",
                  "ITL max ms", "long prompt TTFT p50 ms", "decode tok/s"], rows)


def timeline_overhead_table(data: dict) -> str:
    rows = [[r["case"], str(r["requests"]), str(r["steps"]), fmt(r["step_ms"], digits=2),
             fmt(r["recorder_us_per_step"], digits=1), fmt(r["recorder_share"], 100, 3) + "%",
             fmt(r["tokens_per_s_without"]), fmt(r["tokens_per_s_with"]), fmt(r["snapshot_full_ms"], digits=2)]
            for r in data["results"]]
    return ("recording = time inside the timeline's calls over the engine's time in step(); tokens/s of the same run "
            "without and with the timeline as a check.\n\n"
            + table(["case", "requests", "steps", "step ms", "recording µs/step", "recording share",
                     "tok/s without", "tok/s with", "full snapshot ms"], rows))


def prefix_table(data: dict) -> str:
    rows = []
    for r in data["results"]:
        head = [r["workload"], r["system"], "on" if r["prefix_caching"] else "off", str(r["requests"])]
        if "error" in r:
            rows.append(head + ["failed: " + r["error"][:80]] + ["–"] * 9)
            continue
        rows.append(head + [str(r["prompt_tokens"]), str(r.get("cached_tokens", "–")),
                            "–" if r.get("hit_rate") is None else fmt(r["hit_rate"], 100, 0) + "%",
                            fmt(r["seconds"], digits=2),
                            fmt(r["total_tokens_per_s"]), fmt(r["output_tokens_per_s"]),
                            fmt(r.get("ttft_p50_s"), 1e3, 0), fmt(r.get("ttft_p99_s"), 1e3, 0),
                            "–" if r.get("of_bound") is None else fmt(r["of_bound"], 100, 0) + "%"])
    gains = "; ".join(f"{g['workload']} {g['total_tokens_per_s']:.2f}× tokens/s"
                      + (f" (floors {g['bound']:.2f}×)" if "bound" in g else "") + f", TTFT p50 {g['ttft_p50']:.2f}×"
                      for g in data.get("ratios", []))
    return (f"caching on / off (TTFT: off / on): {gains or '–'}. tok/s counts prompt and output tokens; cached: "
            "prompt tokens whose K/V came from the cache; of floor: the floor of the schedule that ran "
            "(bench/README.md, Bounds; a block several sequences of a step hold read once) over the time it took, "
            "and the floors' ratio the most the cache could gain on those schedules.\n\n"
            + table(["workload", "system", "prefix caching", "requests", "prompt tokens", "cached", "hit rate",
                     "seconds", "tok/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "of floor"], rows))


TABLES = {"throughput": throughput_table, "http": http_table, "scale": scale_table, "decode": decode_table,
          "prefill": prefill_table, "longtail": longtail_table,
          "poisson": poisson_table, "interference": interference_table,
          "timeline-overhead": timeline_overhead_table, "prefix": prefix_table}
