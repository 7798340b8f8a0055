"""The model runner: owns the model, the KV cache tensors, the decode CUDA graphs and the sampler on one device.

`run(plan)` turns the sequences the scheduler picked (each with how many new tokens it contributes) into one
packed forward, decodes first: flat token ids, positions and slot mapping built with numpy, block tables and
context lengths; then one sampler call for every sequence that has reached the end of its tokens. On a GPU a
step replays a captured graph (decode-only or mixed) when one fits, else it runs eagerly.

`launch(plan)` queues the step and returns at once, so the engine can prepare the next step while the device
computes this one. The next step's decodes then feed tokens the host does not know yet: a sequence's
`num_pending` token was sampled by the step launched last, and the device takes it from that step's sampled ids
(`sampled`, in the runner's memory) by row, in place of an id from the host.
"""
import itertools
import logging
from typing import Protocol

import numpy as np
import torch

from engine import tiled
from engine.attention import invariant, metadata as attention_metadata, reference
from engine.cuda_graphs import DecodeGraphs, MixedGraphs, capture_all, kept_logits_bytes, step_token_ids
from engine.kv_cache import BlockManager
from engine.params import SampledToken, SamplingParams
from engine.sampler import Drawn, Sampler
from model import GPT

log = logging.getLogger(__name__)

PLANS = {"reference": reference.plan, "invariant": invariant.plan}  # the attentions in plain PyTorch
TRITON = ("triton", "triton-invariant")  # the attentions of the Triton kernels (BATCH_INVARIANT's: prefill only)
GPU_SPARE = 1 << 30  # bytes of free GPU memory the KV pool leaves to activations and the CUDA graphs at least


class Sequence(Protocol):
    id: int
    token_ids: list[int]  # prompt + generated so far
    num_computed: int  # tokens whose K/V are already in the cache
    num_pending: int  # 1 when the step launched last sampled a token the host has not read yet (it follows token_ids)
    params: SamplingParams
    seed: int | None  # set by the runner at the first draw when the request gave none


def kv_bytes_per_token(model: GPT, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.n_layer * c.n_embd * torch.empty((), dtype=dtype).element_size()


class LaunchedStep:
    """A step queued on the device; `wait()` returns its sampled tokens by sequence id."""

    def __init__(self, ids: list[int], drawn: Drawn | None):
        self.ids, self.drawn = ids, drawn

    def wait(self) -> dict[int, SampledToken]:
        return dict(zip(self.ids, self.drawn.collect())) if self.drawn else {}


class ModelRunner:

    def __init__(self, model: GPT, device: torch.device, dtype: torch.dtype, block_size: int = 16,
                 num_blocks: int | None = None, kv_cache_gb: float = 2.0, gpu_memory_utilization: float = 0.9,
                 seed: int | None = None, attention: str = "reference", cuda_graphs: bool = False,
                 max_batch: int = 128, max_step_tokens: int = 2048, vocab_size: int | None = None,
                 prefix_caching: bool = True):
        self.device, self.dtype, self.attention = device, dtype, attention
        if device.type == "cuda":
            # cuDNN's attention builds a new plan for every new shape (tens of ms each); the reference path's
            # decode contexts grow every step, so it would keep building. The other fused kernels take any shape.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model = model.to(device=device, dtype=dtype).eval()
        if attention == "invariant":
            self.model.use_product(invariant.linear)
        elif attention == "triton-invariant":  # per-row kernels keep their fusion; the products are Triton's own
            self.model.fuse_kernels()
            from engine import triton_linear  # triton only on this path
            self.model.use_product(triton_linear.invariant_linear, triton_linear.invariant_gelu_product)
        elif attention == "triton":  # the GPU path (interpreted on a CPU, for tests): fewer launches per step
            self.model.fuse_kernels()
            if device.type == "cuda":  # a step of a few rows: Triton's products (engine/triton_linear.py)
                from engine import triton_linear
                self.model.use_product(triton_linear.product, triton_linear.gelu_product)
        elif device.type == "cpu":  # the CPU path: a decode step's short products spread over every core
            self.model.use_product(tiled.linear)
        # the vocab projection's rows padded to the CPU path's tiles, or for cuBLAS's aligned kernels on a GPU
        cpu_tiles = self.model.lm_head.product is tiled.linear
        if cpu_tiles or device.type == "cuda":
            self.model.pad_vocab(tiled.TILE if cpu_tiles else 64)
        c = model.config
        graphs = cuda_graphs and device.type == "cuda" and attention in TRITON  # (the PyTorch attentions: eager)
        # BATCH_INVARIANT runs decodes through the prefill kernel too (all_prefill): the mixed graphs take them
        decode_graphs = graphs and attention == "triton"
        # decodes that begin with the same cached blocks attend to them once (cascade attention), in graphs of
        # their own: the default path's launches stay as they were when nothing is shared
        self.shared_prefix = attention == "triton" and prefix_caching
        cascade_graphs = decode_graphs and self.shared_prefix
        if num_blocks is None:
            graph_bytes = kept_logits_bytes(max_batch, c.vocab_size, cascade_graphs) if decode_graphs else 0
            num_blocks = self._blocks_that_fit(block_size, kv_cache_gb, gpu_memory_utilization, graph_bytes)
        # (k/v, layer, block, slot, head, head_dim): one allocation, a view per layer; one spare block for padding
        self.kv_cache = torch.zeros(2, c.n_layer, num_blocks + 1, block_size, c.n_head, c.n_embd // c.n_head,
                                    device=device, dtype=dtype)
        for i, block in enumerate(self.model.transformer.h):
            block.attn.k_cache, block.attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.table_width = -(-c.block_size // block_size)  # blocks of the longest context
        self.block_manager = BlockManager(num_blocks, block_size, self.table_width, prefix_caching)
        self.sampler = Sampler(device, min(vocab_size or c.vocab_size, c.vocab_size), seed)
        self.max_batch = max_batch
        self.sampled = torch.zeros(max_batch, dtype=torch.int64, device=device)  # the last step's ids, by row
        self._sampled_rows: dict[int, int] = {}  # sequence id -> its row in `sampled`
        log.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GB); attention: %s", num_blocks, block_size,
                 num_blocks * block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 1e9, attention)
        self.graphs = self.cascade_graphs = self.mixed_graphs = None
        self.capture: dict = {}  # what capturing the graphs took (count, seconds, MiB)
        if graphs:
            pad_slot, vocab = self.block_manager.pad_slot, self.sampler.vocab_size
            if decode_graphs:
                self.graphs = DecodeGraphs(self.model, max_batch, self.table_width, pad_slot, vocab, self.sampled)
            if cascade_graphs:
                self.cascade_graphs = DecodeGraphs(
                    self.model, max_batch, self.table_width, pad_slot, vocab, self.sampled,
                    shared_splits=attention_metadata.shared_splits(self.table_width * block_size))
            self.mixed_graphs = MixedGraphs(self.model, max(max_step_tokens, max_batch), max_batch, self.table_width,
                                            pad_slot, vocab, self.sampled)
            self.capture = capture_all([g for g in (self.graphs, self.cascade_graphs, self.mixed_graphs) if g])

    def _blocks_that_fit(self, block_size: int, kv_cache_gb: float, gpu_memory_utilization: float,
                         graph_bytes: int) -> int:
        per_block = kv_bytes_per_token(self.model, self.dtype) * block_size
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # this process's share of the card less what it holds (the weights) and what its graphs will keep, and
            # never more than is free: so engines that share a GPU, each given a fraction (serving/master.py), do
            # not count each other's
            budget = min(gpu_memory_utilization * total - torch.cuda.memory_reserved(self.device),
                         free - GPU_SPARE) - graph_bytes
        else:
            budget = kv_cache_gb * 1e9
        if budget < 2 * per_block:
            raise RuntimeError(f"no memory left for the KV cache on {self.device}")
        return int(budget // per_block) - 1  # the spare block

    def run(self, plan: list[tuple[Sequence, int]]) -> dict[int, SampledToken]:
        """One forward for the whole plan; returns the sampled token of each sequence (by id) whose known tokens
        are all in the cache after this step."""
        return self.launch(plan).wait()

    @torch.inference_mode()
    def launch(self, plan: list[tuple[Sequence, int]]) -> LaunchedStep:
        """`run`, queued on the device: the host is free until it waits for the sampled tokens."""
        if len(plan) > self.max_batch:
            raise ValueError(f"a step of {len(plan)} sequences, more than max_batch={self.max_batch}")
        plan = sorted(plan, key=lambda item: item[1] != 1)  # decodes first (a stable sort keeps the rest)
        seqs = [seq for seq, _ in plan]
        query_lens, computed, known = np.array([(n, seq.num_computed, len(seq.token_ids) + seq.num_pending)
                                                for seq, n in plan], dtype=np.int64).T
        context_lens = computed + query_lens
        ids, from_device = self._token_ids(plan)
        samples = context_lens == known  # the rest are mid-prompt chunks
        sample_rows = (np.cumsum(query_lens) - 1)[samples]
        bm = self.block_manager
        tables = bm.table_array([s.id for s in seqs], self.table_width if self.graphs or self.mixed_graphs else None)
        step = attention_metadata.pack_step(query_lens, context_lens, tables, bm.block_size)
        shared = attention_metadata.find_shared_prefix(step, bm.block_size) if self.shared_prefix else None
        argmax = None
        mixed = self.mixed_graphs
        decode_graphs = self._decode_graphs(len(seqs), shared) if step.num_decodes == len(seqs) else None
        if decode_graphs:
            logits, argmax = decode_graphs.run(ids, from_device, step, shared)
            if not samples.all():  # a prompt's single-token chunk that is not its last
                rows = torch.from_numpy(sample_rows).to(self.device)  # a decode step's rows are its sequences
                logits, argmax = logits[rows], argmax[rows]
        elif mixed and len(ids) <= mixed.max_bucket and len(seqs) <= mixed.max_batch:
            logits, argmax = mixed.run(ids, from_device, step, sample_rows)
        else:
            logits = self._forward(ids, step, sample_rows, from_device, shared)
        samplers = [seq for seq, sample in zip(seqs, samples) if sample]
        self._sampled_rows = {seq.id: row for row, seq in enumerate(samplers)}
        if not samplers:
            return LaunchedStep([], None)
        for seq in samplers:
            if seq.seed is None:
                seq.seed = self.sampler.new_seed()
        drawn = self.sampler.draw(logits, [s.params for s in samplers], [s.seed for s in samplers],
                                  known[samples].tolist(), argmax)
        self.sampled[:len(samplers)].copy_(drawn.tokens)
        return LaunchedStep([seq.id for seq in samplers], drawn)

    def _decode_graphs(self, batch: int, shared: attention_metadata.PrefixShare | None) -> DecodeGraphs | None:
        """The graphs for a decode step of `batch` sequences, the shared-prefix ones when its decodes share one."""
        for graphs in (self.cascade_graphs if shared else None, self.graphs):
            if graphs and batch <= graphs.max_bucket:
                return graphs
        return None

    def _token_ids(self, plan: list[tuple[Sequence, int]]) -> tuple[np.ndarray, np.ndarray]:
        """The step's token ids as far as the host knows them, and for each the row of `sampled` to take it from
        instead (-1: the host's id). Only a decode can feed a pending token: the step that sampled it was the
        sequence's last, and the one before this."""
        if all(n == 1 for _, n in plan):  # one token each: no slices to build
            ids = np.array([seq.token_ids[seq.num_computed] if seq.num_computed < len(seq.token_ids) else 0
                            for seq, _ in plan], dtype=np.int64)
        else:
            ids = np.array(list(itertools.chain.from_iterable(  # a pending token's slice is empty: 0 holds its row
                seq.token_ids[seq.num_computed:seq.num_computed + n] or [0] for seq, n in plan)), dtype=np.int64)
        from_device = np.full(len(ids), -1, dtype=np.int64)
        for row, (seq, n) in enumerate(plan):  # decodes come first, a row each
            if n != 1:
                break
            if seq.num_computed == len(seq.token_ids):  # its token is the pending one
                from_device[row] = self._sampled_rows[seq.id]
        return ids, from_device

    def _forward(self, ids: np.ndarray, step: attention_metadata.StepInputs, sample_rows: np.ndarray,
                 from_device: np.ndarray | None = None,
                 shared: attention_metadata.PrefixShare | None = None) -> torch.Tensor:
        meta = attention_metadata.build_metadata(step, self.device, self.attention == "triton-invariant", shared)
        if self.attention in PLANS:
            meta.reference = PLANS[self.attention](step, self.block_manager.block_size, self.device)
        as_tensor = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)
        tokens = as_tensor(ids)
        if from_device is not None and (from_device >= 0).any():
            tokens = step_token_ids(tokens, as_tensor(from_device), self.sampled)
        return self.model(tokens, as_tensor(step.positions), meta, as_tensor(sample_rows))
