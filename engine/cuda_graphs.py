"""Decode steps on CUDA graphs: the whole forward of a decode-only step, captured once per batch-size bucket
over static input buffers, then replayed with one launch instead of hundreds.

A step of B decodes replays the graph of the smallest bucket >= B. Its B real rows are copied into the buffers;
the padding rows write their K/V into the pool's spare block (`BlockManager.pad_slot`) and attend to one slot,
so a padded step never writes into a block that belongs to a sequence, whatever the buffers held before.
Prefill and mixed steps run eagerly: their shapes (tokens per sequence) vary too much to capture.
"""
import logging
import time

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata, StepInputs
from model import GPT

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, then every 16 up to max_batch (which is always a bucket)."""
    small = [b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_batch]
    return small + list(range(48, max_batch, 16)) + [max_batch]


class DecodeGraphs:

    def __init__(self, model: GPT, max_batch: int, table_width: int, pad_slot: int, device: torch.device):
        self.model, self.table_width, self.pad_slot = model, table_width, pad_slot
        self.buckets = batch_buckets(max_batch)
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), pad_slot, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, table_width, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # each graph's output buffer

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:b], block_tables=self.block_tables[:b],
                                 context_lens=self.context_lens[:b], num_decodes=b,
                                 query_start=self.context_lens[:1], max_query_len=0)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, in one shared memory pool."""
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info()[0]
        pool = None
        for b in reversed(self.buckets):
            args = (self.ids[:b], self.positions[:b], self._meta(b))
            side = torch.cuda.Stream()  # warm up (compile kernels, pick algorithms) off the capture
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.model(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self.model(*args)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch %s) in %.1f s, %.0f MiB", len(self.buckets),
                 ",".join(map(str, self.buckets)), time.perf_counter() - start,
                 (free_before - torch.cuda.mem_get_info()[0]) / 2 ** 20)

    def run(self, ids: np.ndarray, step: StepInputs) -> torch.Tensor:
        """Replay the bucket that fits this decode step; (B, vocab) fp32 logits, one row per decode."""
        B = len(ids)
        b = next(bucket for bucket in self.buckets if bucket >= B)
        pad = b - B
        copy = lambda buf, a: buf[:b].copy_(torch.from_numpy(a), non_blocking=True)
        copy(self.ids, np.pad(ids, (0, pad)))
        copy(self.positions, np.pad(step.positions, (0, pad)))
        copy(self.slots, np.pad(step.slots, (0, pad), constant_values=self.pad_slot))
        copy(self.context_lens, np.pad(step.context_lens.astype(np.int32), (0, pad), constant_values=1))
        copy(self.block_tables, np.pad(step.block_tables, ((0, pad), (0, 0))))
        self.graphs[b].replay()
        return self.logits[b][:B]
