"""Decode steps on CUDA graphs: the whole forward of a decode-only step, captured once per batch-size bucket
over static input buffers, then replayed with one launch instead of hundreds.

A step of B decodes replays the graph of the smallest bucket >= B. Its inputs (token ids, positions, slots,
context lengths, block tables) are written into one pinned host buffer and reach the device in one copy. The
padding rows write their K/V into the pool's spare block (`BlockManager.pad_slot`) and attend to one slot, so a
padded step never writes into a block that belongs to a sequence, whatever the buffers held before. Each graph
also takes the argmax of its logits, so a greedy step reads back token ids and nothing else.
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

    def __init__(self, model: GPT, max_batch: int, table_width: int, pad_slot: int, vocab_size: int,
                 device: torch.device):
        self.model, self.pad_slot, self.vocab_size = model, pad_slot, vocab_size
        self.buckets = batch_buckets(max_batch)
        n, w = self.buckets[-1], table_width
        # one int64 buffer, sections of n rows: ids, positions, slots, context lengths, then (n, w) block tables
        self.host = torch.zeros((4 + w) * n, dtype=torch.int64, pin_memory=True)
        self.inputs = torch.zeros_like(self.host, device=device)
        self.host_view = self._sections(self.host.numpy(), n, w)
        self.ids, self.positions, self.slots, self.context_lens, self.block_tables = self._sections(self.inputs, n, w)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # each graph's (logits, argmax ids)

    @staticmethod
    def _sections(buf, n: int, w: int) -> tuple:
        return buf[:n], buf[n:2 * n], buf[2 * n:3 * n], buf[3 * n:4 * n], buf[4 * n:].reshape(n, w)

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        meta = AttentionMetadata(slot_mapping=self.slots[:b], block_tables=self.block_tables[:b],
                                 context_lens=self.context_lens[:b], num_decodes=b,
                                 query_start=self.context_lens[:1], max_query_len=0)
        logits = self.model(self.ids[:b], self.positions[:b], meta)
        return logits, logits[:, :self.vocab_size].argmax(dim=-1)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, in one shared memory pool."""
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info()[0]
        self._write_padding(0, self.max_batch)
        self.inputs.copy_(self.host)
        pool = None
        for b in reversed(self.buckets):
            side = torch.cuda.Stream()  # warm up (compile kernels, pick algorithms) off the capture
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch %s) in %.1f s, %.0f MiB", len(self.buckets),
                 ",".join(map(str, self.buckets)), time.perf_counter() - start,
                 (free_before - torch.cuda.mem_get_info()[0]) / 2 ** 20)

    def _write_padding(self, lo: int, hi: int) -> None:
        ids, positions, slots, context_lens, _ = self.host_view
        ids[lo:hi], positions[lo:hi], slots[lo:hi], context_lens[lo:hi] = 0, 0, self.pad_slot, 1

    def run(self, ids: np.ndarray, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the bucket that fits this decode step: (B, vocab) fp32 logits and (B,) argmax ids, one row per
        decode. The host buffer is rewritten only after the previous step's results were read back, which waited
        for its copy."""
        B = len(ids)
        b = next(bucket for bucket in self.buckets if bucket >= B)
        host_ids, positions, slots, context_lens, tables = self.host_view
        host_ids[:B], positions[:B], slots[:B], context_lens[:B] = ids, step.positions, step.slots, step.context_lens
        tables[:B] = step.block_tables
        self._write_padding(B, b)
        self.inputs.copy_(self.host, non_blocking=True)
        self.graphs[b].replay()
        logits, argmax = self.outputs[b]
        return logits[:B], argmax[:B]
