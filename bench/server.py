"""The real server an HTTP benchmark runs against (client/server_process.py starts and stops it), and the load a
benchmark sends it (client/load.py)."""
import argparse
import contextlib

import torch

from bench.common import weights_for
from bench.throughput import overlap_setting
from client.load import Load, run_load
from client.server_process import running_server
from client.workload import Request


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, help="the server's ENGINES (default: its own, one per visible GPU)")
    p.add_argument("--stream-interval-ms", help="comma list of the server's STREAM_INTERVAL_MS, a server each, its "
                                                "rows side by side (default: the server's own: a token per event)")


def stream_intervals(args: argparse.Namespace) -> list[float | None]:
    """The STREAM_INTERVAL_MS of each server to run (None: the server's default)."""
    return [float(ms) for ms in args.stream_interval_ms.split(",")] if args.stream_interval_ms else [None]


def policy_server(args: argparse.Namespace, policy: str, device: torch.device, dtype: torch.dtype,
                  stream_interval_ms: float | None = None) -> contextlib.AbstractContextManager[tuple[str, dict]]:
    """The server a benchmark's flags describe: its model, device, dtype, engines, batch and step limits, CPU
    threads, and how often it sends a stream's text."""
    settings = dict(MAX_BATCH=args.max_batch, MAX_STEP_TOKENS=args.max_step_tokens,
                    OVERLAP_STEPS=overlap_setting(args))
    if args.engines:
        settings["ENGINES"] = args.engines
    if stream_interval_ms is not None:
        settings["STREAM_INTERVAL_MS"] = stream_interval_ms
    if args.threads:
        settings["OMP_NUM_THREADS"] = args.threads  # torch's intra-op pool follows it
    settings.update(MODEL=args.model, WEIGHTS=weights_for(args.model), DEVICE=str(device),
                    DTYPE=str(dtype).removeprefix("torch."))
    return running_server(policy, settings)


def send_load(url: str, requests: list[Request], desc: str | None = None) -> Load:
    """A benchmark's load: streamed where the server streams (TTFT and ITL as a client sees them), and exact (greedy,
    EOS ignored), so that every system and every run produces the same tokens."""
    return run_load(url, requests, stream=True, exact=True, desc=desc)
