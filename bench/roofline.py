"""The memory-bandwidth floor of a decode step: every weight and every cached K/V is read once per step, so a
step can take no less than (weight bytes + KV bytes) / copy bandwidth."""
import time

import torch

from bench.common import sync


def copy_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes per second that `y.copy_(x)` moves (read + write), on tensors far larger than any cache."""
    x = torch.empty(int(gib * (1 << 30)) // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * x.element_size() * repeats / (time.perf_counter() - start)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights count once
