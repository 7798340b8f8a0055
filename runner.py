"""The model runner: owns the model, the KV cache tensors and the sampler on one device.

`run(plan)` turns the sequences the scheduler picked (each with how many new tokens it contributes) into one
packed forward: flat token ids and positions, a slot mapping into the paged cache, block tables and context
lengths; then one sampler call for every sequence that has reached the end of its known tokens.
"""
import logging
from typing import Protocol

import torch

from kv_cache import BlockManager
from model import GPT, AttentionMetadata
from sampling import SampledToken, Sampler, SamplingParams

log = logging.getLogger(__name__)


class Sequence(Protocol):
    id: int
    token_ids: list[int]  # prompt + generated so far
    num_computed: int  # tokens whose K/V are already in the cache
    params: SamplingParams
    generator: torch.Generator | None


def kv_bytes_per_token(model: GPT, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.n_layer * c.n_embd * torch.empty((), dtype=dtype).element_size()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={name} but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown DTYPE {name!r}; use auto, {', '.join(dtypes)}")
    return dtypes[name]


class ModelRunner:

    def __init__(self, model: GPT, device: torch.device, dtype: torch.dtype, block_size: int = 16,
                 num_blocks: int | None = None, kv_cache_gb: float = 2.0, gpu_memory_utilization: float = 0.9,
                 seed: int | None = None):
        self.device, self.dtype = device, dtype
        if device.type == "cuda":
            # cuDNN's attention builds a new plan for every new shape (tens of ms each): decode contexts grow
            # every step, so it would keep building. The other fused kernels take any shape.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model = model.to(device=device, dtype=dtype).eval()
        c = model.config
        if num_blocks is None:
            num_blocks = self._blocks_that_fit(block_size, kv_cache_gb, gpu_memory_utilization)
        # (k/v, layer, block, slot, head, head_dim): one allocation, a view per layer
        self.kv_cache = torch.zeros(2, c.n_layer, num_blocks, block_size, c.n_head, c.n_embd // c.n_head,
                                    device=device, dtype=dtype)
        for i, block in enumerate(self.model.transformer.h):
            block.attn.k_cache, block.attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.block_manager = BlockManager(num_blocks, block_size)
        self.sampler = Sampler(device, seed)
        log.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GB)", num_blocks, block_size,
                 num_blocks * block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 1e9)

    def _blocks_that_fit(self, block_size: int, kv_cache_gb: float, gpu_memory_utilization: float) -> int:
        per_block = kv_bytes_per_token(self.model, self.dtype) * block_size
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - gpu_memory_utilization) * total  # leave room for activations and other processes
        else:
            budget = kv_cache_gb * 1e9
        if budget < per_block:
            raise RuntimeError(f"no memory left for the KV cache on {self.device}")
        return int(budget // per_block)

    @torch.inference_mode()
    def run(self, plan: list[tuple[Sequence, int]]) -> dict[int, SampledToken]:
        """One forward for the whole plan; returns the sampled token of each sequence (by id) whose known tokens
        are all in the cache after this step."""
        ids, positions, slots, query_lens, context_lens, sample_rows, samplers = [], [], [], [], [], [], []
        bm = self.block_manager
        for seq, n in plan:
            start = seq.num_computed
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(bm.slot(seq.id, p) for p in range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            if start + n == len(seq.token_ids):
                sample_rows.append(len(ids) - 1)
                samplers.append(seq)
        meta = AttentionMetadata.build(query_lens, context_lens, [bm.tables[seq.id] for seq, _ in plan], slots,
                                       bm.block_size, self.device)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True)
        logits = self.model(as_tensor(ids), as_tensor(positions), meta, as_tensor(sample_rows))
        if not samplers:
            return {}
        for seq in samplers:
            if seq.params.seed is not None and seq.generator is None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        tokens = self.sampler(logits, [s.params for s in samplers], [s.generator for s in samplers])
        return {seq.id: tok for seq, tok in zip(samplers, tokens)}

