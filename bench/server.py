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


def policy_server(args: argparse.Namespace, policy: str, device: torch.device,
                  dtype: torch.dtype) -> contextlib.AbstractContextManager[tuple[str, dict]]:
    """The server a benchmark's flags describe: its model, device, dtype, engines, batch and step limits, CPU
    threads."""
    settings = dict(MAX_BATCH=args.max_batch, MAX_STEP_TOKENS=args.max_step_tokens,
                    OVERLAP_STEPS=overlap_setting(args))
    if args.engines:
        settings["ENGINES"] = args.engines
    if args.threads:
        settings["OMP_NUM_THREADS"] = args.threads  # torch's intra-op pool follows it
    settings.update(MODEL=args.model, WEIGHTS=weights_for(args.model), DEVICE=str(device),
                    DTYPE=str(dtype).removeprefix("torch."))
    return running_server(policy, settings)


def send_load(url: str, requests: list[Request], desc: str | None = None) -> Load:
    """A benchmark's load: streamed where the server streams (TTFT and ITL as a client sees them), and exact (greedy,
    EOS ignored), so that every system and every run produces the same tokens."""
    return run_load(url, requests, stream=True, exact=True, desc=desc)
