"""Peer baselines run in the same process and on the same workload: Hugging Face transformers' continuous
batching manager, and its static `generate` in fixed batches. Same model shape, device and dtype as ours,
greedy, EOS ignored. Each returns (seconds, output tokens) from just before the first request is handed over to
just after the last token is out.
"""
import os
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from bench.common import sync
from client.workload import Request
from model import SHAPES


def hf_model(model: str, device: torch.device, dtype: torch.dtype):
    """GPT2LMHeadModel of `model`'s shape with random weights, or the checkpoint directory's own weights."""
    from transformers import AutoModelForCausalLM, GPT2Config
    torch.manual_seed(0)
    with torch.device(device):
        if os.path.isdir(model):
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa")
        else:
            shape = SHAPES[model]
            config = GPT2Config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                                n_positions=1024, vocab_size=50257)
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).eval()


CPU_CACHE_TOKENS = 256 * 256  # HF's KV cache on the CPU: 256 blocks of its default 256 tokens


@torch.no_grad()
def run_hf_continuous(hf, requests: list[Request], device: torch.device, block_sharing: bool = False,
                      block_size: int | None = None) -> tuple[float, int]:
    """block_sharing: HF's prefix caching (its allow_block_sharing); only full blocks are shared, so a prefix
    benchmark passes our block size (HF's default is 256 tokens, longer than a CPU workload's shared prefix)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.continuous_api import WorkloadHints
    longest = max(r.num_tokens for r in requests)
    config = GenerationConfig(max_new_tokens=longest, do_sample=False, eos_token_id=-1, pad_token_id=0)
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt) for r in requests),
                          max_generated_length=longest, num_requests=len(requests))
    on_cpu = device.type == "cpu"  # on the CPU HF cannot size the cache itself
    block_size = block_size or ContinuousBatchingConfig.block_size
    cb_config = ContinuousBatchingConfig(allow_block_sharing=block_sharing, block_size=block_size,
                                         num_blocks=CPU_CACHE_TOKENS // block_size if on_cpu else None,
                                         max_batch_tokens=512 if on_cpu else None)
    with hf.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb_config,
                                                block=True, timeout=30, workload_hints=hints) as manager:
        sync(device)
        t0 = time.perf_counter()
        ids = [manager.add_request(r.prompt, max_new_tokens=r.num_tokens) for r in requests]
        done, tokens = 0, 0
        with tqdm(total=len(ids), desc="hf continuous", unit="req", leave=False) as bar:
            while done < len(ids):
                result = manager.get_result(timeout=5)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("the HF continuous batching thread died")
                    continue
                if result.is_finished():
                    done += 1
                    tokens += len(result.generated_tokens)
                    bar.update()
        sync(device)
        return time.perf_counter() - t0, tokens


@torch.no_grad()
def run_hf_static(hf, requests: list[Request], batch_size: int, device: torch.device) -> tuple[float, int]:
    """Fixed batches in arrival order, left-padded, each running to its longest member."""
    hf.set_attn_implementation("sdpa")  # the continuous batching manager may have left its paged variant behind
    sync(device)
    t0 = time.perf_counter()
    useful = 0
    for i in tqdm(range(0, len(requests), batch_size), desc=f"hf static {batch_size}", leave=False):
        chunk = requests[i:i + batch_size]
        width = max(len(r.prompt) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[j, width - len(r.prompt):] = 1
        n_new = max(r.num_tokens for r in chunk)
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == width + n_new, out.shape
        useful += sum(r.num_tokens for r in chunk)
    sync(device)
    return time.perf_counter() - t0, useful


def hf_decode_step(hf, batch: int, ctx: int, device: torch.device) -> Callable[[], None]:
    """One HF decode step at batch x ctx, repeatable: a new token per sequence over a DynamicCache holding ctx-1
    tokens of random K/V (what it holds does not change the work), logits and a greedy argmax read back; the
    new token's K/V is cropped off again so every call sees the same context."""
    from transformers import DynamicCache
    c = hf.config
    shape = (batch, c.n_head, ctx - 1, c.n_embd // c.n_head)
    cache = DynamicCache(config=c)
    for layer in range(c.n_layer):
        cache.update(torch.randn(shape, device=device, dtype=hf.dtype),
                     torch.randn(shape, device=device, dtype=hf.dtype), layer)
    tokens = torch.randint(0, c.vocab_size, (batch, 1), device=device)

    @torch.no_grad()
    def step() -> None:
        hf(input_ids=tokens, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1).tolist()
        cache.crop(-1)

    return step


def warm_up(hf, device: torch.device) -> None:
    with torch.no_grad():
        hf.generate(input_ids=torch.ones(2, 8, dtype=torch.long, device=device), max_new_tokens=4,
                    do_sample=False, pad_token_id=0)
