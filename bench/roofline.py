"""The floors a step cannot go below, from two limits of the card measured in the same run: the bandwidth at which
it copies memory and the throughput of its matmuls. A step reads every weight and every cached K/V it attends to
once, so it takes at least (weight bytes + KV bytes) / copy bandwidth; it does its FLOPs (forward_flops) at most
at the matmul throughput; its floor is the larger of the two (bench/README.md, "Bounds")."""
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import sync
from model import GPTConfig

MATMUL_ROWS = {"cuda": (2048, 4096, 8192), "cpu": (256, 1024)}  # a step's tokens (MAX_STEP_TOKENS 2048) and more


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


def matmul_throughput(device: torch.device, dtype: torch.dtype, n_embd: int, seconds: float = 0.2) -> float:
    """FLOP/s of the model's MLP matmuls at their best: tokens × n_embd into 4·n_embd and back, in nn.Linear's
    layout, for a few token counts (MATMUL_ROWS), each timed after warm-up."""
    best = 0.0
    for rows in MATMUL_ROWS.get(device.type, MATMUL_ROWS["cpu"]):
        for k, n in ((n_embd, 4 * n_embd), (4 * n_embd, n_embd)):
            x = torch.randn(rows, k, device=device, dtype=dtype)
            w = torch.randn(n, k, device=device, dtype=dtype)
            best = max(best, 2 * rows * k * n / seconds_per_call(lambda: F.linear(x, w), device, seconds))
    return best


def seconds_per_call(call: Callable[[], object], device: torch.device, seconds: float) -> float:
    """Mean seconds of `call` after three warm-up calls, over as many calls as are launched in `seconds` (at least
    three); the device is waited for only at the ends, so that launches overlap the work as in a forward."""
    for _ in range(3):
        call()
    sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        call()
        calls += 1
    sync(device)
    return (time.perf_counter() - start) / calls


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights count once


def forward_flops(config: GPTConfig, cached: int, new: int, samples: bool) -> int:
    """FLOPs of one sequence's `new` tokens after `cached` tokens in the cache: 2 per token and weight of the blocks'
    matmuls (12·n_layer·n_embd² weights: qkv, attention out, the MLP's two), 4·n_layer·n_embd per (query, key) pair
    of causal attention (QKᵀ and the weighted sum of V; new token i attends to cached + i keys), and the logits'
    2·vocab·n_embd when the sequence samples a token (the runner computes logits for those rows only)."""
    c = config
    pairs = new * cached + new * (new + 1) // 2
    return (2 * 12 * c.n_layer * c.n_embd ** 2 * new + 4 * c.n_layer * c.n_embd * pairs
            + 2 * c.vocab_size * c.n_embd * samples)


def distinct_kv_tokens(rows: list[tuple[int, int, bool]], tables: np.ndarray, block_size: int) -> int:
    """The K/V tokens a step of `rows` (as step_floor_s's) reads at least once: every sequence's context (its cached
    and new tokens, in the blocks of its row of `tables`), a block that several sequences hold counted once (a
    shared prefix, read once for all of them by cascade attention)."""
    context_lens = np.array([cached + new for cached, new, _ in rows])
    used = np.clip(context_lens[:, None] - np.arange(tables.shape[1]) * block_size, 0, block_size)
    held = used > 0
    tokens = np.zeros(int(tables[held].max()) + 1, dtype=np.int64)
    np.maximum.at(tokens, tables[held], used[held])
    return int(tokens.sum())


def step_floor_s(config: GPTConfig, rows: list[tuple[int, int, bool]], weights: int, kv_per_token: int,
                 bandwidth: float, matmul: float, kv_tokens: int | None = None) -> float:
    """The least time a step of `rows` (per sequence: cached tokens, new tokens, whether it samples) can take: its
    weights and its sequences' K/V (the cached and the new tokens, or `kv_tokens` where blocks are shared:
    distinct_kv_tokens) read at the copy bandwidth (bytes/s), or its FLOPs at the matmul throughput (FLOP/s),
    whichever is longer."""
    if kv_tokens is None:
        kv_tokens = sum(cached + new for cached, new, _ in rows)
    bytes_read = weights + kv_per_token * kv_tokens
    flops = sum(forward_flops(config, *row) for row in rows)
    return max(bytes_read / bandwidth, flops / matmul)
