"""Assembles a model runner from the server's settings: weights, device, dtype, KV pool, attention, graphs."""
import logging
import time

import torch

from engine.config import Settings
from engine.device import resolve_attention, resolve_device, resolve_dtype, resolve_max_batch, resolve_overlap
from engine.loader import load_model
from engine.runner import ModelRunner
from engine.tokenizer import VOCAB_SIZE

log = logging.getLogger(__name__)


def build_runner(s: Settings) -> tuple[ModelRunner, dict]:
    """The runner, and what /health and /stats say about it."""
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    attention = resolve_attention(s.attention, device, s.batch_invariant)
    overlap = resolve_overlap(s.overlap_steps, device)
    max_batch = resolve_max_batch(s.max_batch, device)
    start = time.perf_counter()
    model, weights = load_model(s.model, s.weights)
    runner = ModelRunner(model, device, dtype, block_size=s.block_size, num_blocks=s.kv_blocks,
                         kv_cache_gb=s.kv_cache_gb, gpu_memory_utilization=s.gpu_memory_utilization, seed=s.seed,
                         attention=attention, cuda_graphs=s.cuda_graphs, max_batch=max_batch,
                         max_step_tokens=s.max_step_tokens, vocab_size=VOCAB_SIZE, prefix_caching=s.prefix_caching)
    info = {"policy": s.policy, "model": s.model, "weights": weights,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "attention": attention, "overlap-steps": overlap,
            "max-batch": max_batch, "max-context": model.config.block_size,
            "kv-cache-tokens": runner.block_manager.num_blocks * s.block_size, "prefix-caching": s.prefix_caching,
            "batch-invariant": s.batch_invariant,
            "cuda-graphs": 0, **runner.capture,  # on a GPU: how many, their capture time and memory
            "startup-s": round(time.perf_counter() - start, 2)}
    if weights == "random":
        info["warning"] = "random weights: completions are meaningless text"
    log.info("%s (%s weights) on %s in %s ready in %.1f s", s.model, weights, info["device"], info["dtype"],
             time.perf_counter() - start)
    return runner, info
