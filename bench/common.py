"""What every sub-command shares: the common flags, CPU vs full sizes, the run's metadata and its JSON file.

A result file is `{"benchmark", "info", "config", "results", ...}`; `info` says what ran where (device, torch,
dtype, model, weights, git commit, date, CPU load), so a number never travels without its context.
"""
import argparse
import datetime
import json
import os
import re
import subprocess

import torch

from bench import report
from model import SHAPES
from engine.device import resolve_device, resolve_dtype, resolve_max_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a GPT-2 shape (random weights) or an HF/nanoGPT checkpoint directory; "
                                   "default gpt2 on CPU, gpt2-medium with --full")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--out", help="output directory (default bench/results/<device>)")
    p.add_argument("--full", action="store_true", help="the full workload sizes of bench/README.md (the default on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload's lengths, token ids and arrivals")
    p.add_argument("--threads", type=int, help="CPU threads for torch here and in the servers started (default: "
                                               "torch's, one per core; on a shared CPU 1 keeps the timings stable)")


def resolve(args: argparse.Namespace, cpu: dict, full: dict) -> tuple[torch.device, torch.dtype]:
    """Fill in device, dtype, model, output directory and every size left unset, from the CPU or the full
    preset (full on a GPU or with --full)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.full = args.full or device.type == "cuda"
    for name, value in (full if args.full else cpu).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.model = args.model or ("gpt2-medium" if args.full else "gpt2")
    if "max_batch" in vars(args):  # the server's default for this device, written in the results' config
        args.max_batch = resolve_max_batch(args.max_batch, device)
    args.out = args.out or os.path.join(RESULTS, device_tag(device))
    os.makedirs(args.out, exist_ok=True)
    return device, dtype


def weights_for(model: str) -> str:
    """A shape name gets random weights (speed does not depend on their values); a directory is loaded."""
    return "random" if model in SHAPES else "pretrained"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_tag(device: torch.device) -> str:
    """'cpu', or the GPU's name as a directory name: 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def sync(device: torch.device) -> None:
    """Wait for the device, so that a host clock read after it sees the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    """HEAD (with -dirty for local changes); GIT_COMMIT names it where the tree was copied without .git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get("GIT_COMMIT", "unknown")


def run_info(device: torch.device, dtype: torch.dtype, model: str) -> dict:
    info = dict(device=device_name(device), torch=torch.__version__, dtype=str(dtype).removeprefix("torch."),
                model=os.path.basename(model.rstrip("/")), weights=weights_for(model), git_commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), load_avg_start=os.getloadavg()[0])
    if device.type == "cuda":  # PDL=false runs a baseline beside it (engine/pdl.py)
        from engine import pdl
        info["pdl"] = pdl.enabled(device)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


class ResultFile:
    """`<out>/<benchmark>.json`, rewritten after every row so a run cut short keeps what it measured."""

    def __init__(self, args: argparse.Namespace, benchmark: str, info: dict):
        self.path = os.path.join(args.out, f"{benchmark}.json")
        config = {k: v for k, v in vars(args).items() if not callable(v)}
        self.data = dict(benchmark=benchmark, info=info, config=config, results=[])

    def add(self, row: dict) -> None:
        self.data["results"].append(row)
        self.save()

    def save(self) -> None:
        self.data["info"]["load_avg_end"] = os.getloadavg()[0]
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)

    def finish(self) -> str:
        """Save, draw the plot and refresh results.md."""
        self.save()
        report.refresh(os.path.dirname(self.path), redraw=(self.data["benchmark"],))
        return self.path
