"""Steps on CUDA graphs: the whole forward of a step, captured once per size bucket over static input buffers,
then replayed with one launch instead of hundreds (an eager step of gpt2-medium spends ~10 ms launching).

Two families share one memory pool. Decode graphs, one per batch-size bucket, run steps where every sequence adds
one token, through the split-context decode kernel. Mixed graphs, one per token-count bucket, run any other step
(prefill chunks, with or without decodes) with max_batch sequence slots, every sequence through the prefill
kernel's work list. A step replays the smallest bucket that fits; its inputs (token ids, positions, slots, context
lengths, block tables, ...) are written into one pinned host buffer and reach the device in one copy. Two host
buffers take turns: the engine writes step N+1's inputs while step N's copy may still be queued. A token the host
does not know yet (sampled by the step before) is taken on the device from the runner's `sampled` ids. Padding
rows write their K/V into the pool's spare block (`BlockManager.pad_slot`) and belong to no sequence, so a padded
step never writes into a block that belongs to a sequence, whatever the buffers held before. A decode graph also
takes the argmax of its logits, so a greedy step reads back token ids and nothing else. A mixed graph ends at the
final layer norm of its max_batch sampling slots; the vocab projection then runs eagerly over the rows that do
sample (a prefill step has a few): inside the graph it ran over all max_batch slots every time (at MAX_BATCH 512,
53 GFLOP and 100 MB of fp32 logits per step), and each bucket kept 512 rows of logits.
"""
import logging
import time

import numpy as np
import torch

from engine.attention.metadata import (BLOCK_M, MIN_SHARING_DECODES, AttentionMetadata, PrefixShare, SharedPrefix,
                                       StepInputs, prefill_work)
from model import GPT

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, then every 16 up to max_batch (which is always a bucket)."""
    small = [b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_batch]
    return small + list(range(48, max_batch, 16)) + [max_batch]


def cascade_buckets(max_batch: int) -> list[int]:
    """The batch buckets of the shared-prefix decode graphs: from MIN_SHARING_DECODES, coarser than batch_buckets
    (a step pads up to about 1.5x its decodes), for they are a second set."""
    coarse = [16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    return [b for b in coarse if MIN_SHARING_DECODES <= b < max_batch] + [max_batch]


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two from 32 up to max_tokens (which is always a bucket)."""
    return [n for n in (32, 64, 128, 256, 512, 1024, 2048, 4096) if n < max_tokens] + [max_tokens]


def kept_logits_bytes(max_batch: int, vocab_size: int, shared_prefix: bool) -> int:
    """The memory the decode graphs keep for their outputs: each bucket's fp32 logits, a row per sequence (1.8 GB
    at MAX_BATCH 512 for GPT-2's vocabulary; 0.4 GB more with the shared-prefix graphs). The mixed graphs keep
    hidden states only."""
    rows = sum(batch_buckets(max_batch)) + (sum(cascade_buckets(max_batch)) if shared_prefix else 0)
    return 4 * vocab_size * rows


def step_token_ids(ids: torch.Tensor, from_device: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Each row's token id: the host's, or where from_device >= 0 the id the previous step sampled in that row of
    `sampled` (a row of -1 reads sampled[-1] and drops it)."""
    return torch.where(from_device >= 0, sampled[from_device], ids)


class StepGraphs:
    """Graphs of one family over one int64 input buffer made of named sections: two pinned host copies that take
    turns, one on the device."""

    def __init__(self, model: GPT, buckets: list[int], sections: dict[str, tuple[int, ...]], vocab_size: int,
                 sampled: torch.Tensor):
        self.model, self.buckets, self.vocab_size, self.sampled = model, buckets, vocab_size, sampled
        sections = dict(sections, from_device=sections["ids"])
        size = sum(int(np.prod(shape)) for shape in sections.values())
        self.hosts = [torch.zeros(size, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.device_buffer = torch.zeros_like(self.hosts[0], device=sampled.device)
        self.staging: list[dict[str, np.ndarray]] = [{}, {}]  # per host buffer: section name -> numpy view
        self.d, start = {}, 0  # section name -> device view
        for name, shape in sections.items():
            n = int(np.prod(shape))
            for host, views in zip(self.hosts, self.staging):
                views[name] = host.numpy()[start:start + n].reshape(shape)
                views[name][:] = -1 if name == "from_device" else 0
            self.d[name] = self.device_buffer[start:start + n].view(shape)
            start += n
        self.turn = 0  # the host buffer the last step was written into
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, ...]] = {}  # each graph's output tensors

    @property
    def max_bucket(self) -> int:
        return self.buckets[-1]

    def _forward(self, bucket: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _next_host(self) -> dict[str, np.ndarray]:
        """The host buffer to write the next step into: the one the step before last used, whose copy to the
        device is done (the engine has read that step's results, which came after it on the stream)."""
        self.turn ^= 1
        return self.staging[self.turn]

    def capture(self, pool=None):
        """Capture every bucket, largest first; returns the memory pool, for the next family to share."""
        self.device_buffer.copy_(self.hosts[self.turn])
        for bucket in reversed(self.buckets):
            side = torch.cuda.Stream()  # warm up (compile kernels, pick algorithms) off the capture
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self._forward(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph
        return pool

    def _replay(self, bucket: int, rows: int) -> tuple[torch.Tensor, ...]:
        """Send the host buffer of this turn and replay; the first `rows` rows of each output."""
        self.device_buffer.copy_(self.hosts[self.turn], non_blocking=True)
        self.graphs[bucket].replay()
        return tuple(out[:rows] for out in self.outputs[bucket])

    def _hidden(self, n: int, meta: AttentionMetadata, sample_rows=None) -> torch.Tensor:
        d = self.d
        ids = step_token_ids(d["ids"][:n], d["from_device"][:n], self.sampled)
        return self.model.hidden(ids, d["positions"][:n], meta, sample_rows)

    def _logits_and_argmax(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.logits(hidden)
        return logits, logits[:, :self.vocab_size].argmax(dim=-1)


class DecodeGraphs(StepGraphs):
    """Decode steps; with `shared_splits`, steps whose decodes share a cached prefix, attended to once for all of
    them (engine/attention/triton_shared.py), over fewer buckets (cascade_buckets)."""

    def __init__(self, model: GPT, max_batch: int, table_width: int, pad_slot: int, vocab_size: int,
                 sampled: torch.Tensor, shared_splits: int = 0):
        n = max_batch
        sections = dict(ids=(n,), positions=(n,), slots=(n,), context_lens=(n,), block_tables=(n, table_width))
        if shared_splits:
            sections.update(shared_table=(table_width,), shared_len=(1,), shared_lens=(n,))
        buckets = cascade_buckets(max_batch) if shared_splits else batch_buckets(max_batch)
        super().__init__(model, buckets, sections, vocab_size, sampled)
        self.pad_slot, self.shared_splits = pad_slot, shared_splits
        for h in self.staging:
            self._pad(h, 0, n)

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d
        meta = AttentionMetadata(slot_mapping=d["slots"][:b], block_tables=d["block_tables"][:b],
                                 context_lens=d["context_lens"][:b], num_decodes=b, query_start=d["ids"][:1],
                                 prefill_work=d["ids"][:0], block_m=BLOCK_M)
        if self.shared_splits:
            meta.shared = SharedPrefix(d["shared_table"], d["shared_len"], d["shared_lens"][:b], self.shared_splits)
        return self._logits_and_argmax(self._hidden(b, meta))

    def _pad(self, h: dict[str, np.ndarray], lo: int, hi: int) -> None:
        h["ids"][lo:hi], h["from_device"][lo:hi], h["positions"][lo:hi] = 0, -1, 0
        h["slots"][lo:hi], h["context_lens"][lo:hi] = self.pad_slot, 1
        if self.shared_splits:
            h["shared_lens"][lo:hi] = 0

    def run(self, ids: np.ndarray, from_device: np.ndarray, step: StepInputs,
            shared: PrefixShare | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step of B sequences: (B, vocab) fp32 logits and (B,) argmax ids. `shared`
        (metadata.find_shared_prefix's), for the graphs with shared_splits: the prefix the decodes share."""
        B = len(ids)
        b = next(bucket for bucket in self.buckets if bucket >= B)
        h = self._next_host()
        h["ids"][:B], h["from_device"][:B], h["positions"][:B], h["slots"][:B] = ids, from_device, step.positions, \
            step.slots
        h["context_lens"][:B], h["block_tables"][:B] = step.context_lens, step.block_tables
        if self.shared_splits:  # (the plain graphs ignore a shared prefix)
            h["shared_table"][:len(shared.table)] = shared.table
            h["shared_len"][0], h["shared_lens"][:B] = shared.tokens, shared.lens
        self._pad(h, B, b)
        return self._replay(b, B)


class MixedGraphs(StepGraphs):

    def __init__(self, model: GPT, max_tokens: int, max_batch: int, table_width: int, pad_slot: int,
                 vocab_size: int, sampled: torch.Tensor):
        n, s = max_tokens, max_batch
        self.max_items = -(-n // BLOCK_M) + s  # query tiles of any packing of n tokens into s sequences
        super().__init__(model, token_buckets(max_tokens), dict(
            ids=(n,), positions=(n,), slots=(n,), sample_rows=(s,), context_lens=(s,), query_start=(s + 1,),
            block_tables=(s, table_width), work=(self.max_items, 2)), vocab_size, sampled)
        self.pad_slot, self.max_batch = pad_slot, max_batch
        for h in self.staging:
            h["slots"][:], h["context_lens"][:], h["work"][:] = pad_slot, 1, -1

    def _items(self, n: int) -> int:
        return -(-n // BLOCK_M) + self.max_batch

    def capture(self, pool=None):
        pool = super().capture(pool)
        # The vocab projection runs eagerly after each replay, on the rows that sample: run it now at every power of
        # two of rows and one less, so that a product whose kernel depends on them (BATCH_INVARIANT's Triton tiles,
        # compiled on first use for each tile and for a row count that is a multiple of 16 or not) is ready before
        # the first busy step
        hidden = torch.zeros(self.max_batch, self.model.config.n_embd, device=self.device_buffer.device,
                             dtype=self.model.lm_head.weight.dtype)
        for rows in {min(2 ** i - less, self.max_batch) for i in range(1, self.max_batch.bit_length() + 1)
                     for less in (0, 1)}:
            self._logits_and_argmax(hidden[:rows])
        return pool

    def _forward(self, n: int) -> tuple[torch.Tensor]:
        d = self.d
        meta = AttentionMetadata(slot_mapping=d["slots"][:n], block_tables=d["block_tables"],
                                 context_lens=d["context_lens"], num_decodes=0, query_start=d["query_start"],
                                 prefill_work=d["work"][:self._items(n)], block_m=BLOCK_M)
        return self._hidden(n, meta, d["sample_rows"]),

    def run(self, ids: np.ndarray, from_device: np.ndarray, step: StepInputs,
            sample_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Any step of at most max_batch sequences and max_tokens tokens: logits and argmax of sample_rows."""
        N, B, k = len(ids), len(step.query_lens), len(sample_rows)
        n = next(bucket for bucket in self.buckets if bucket >= N)
        h = self._next_host()
        h["ids"][:N], h["from_device"][:N], h["positions"][:N], h["slots"][:N] = ids, from_device, step.positions, \
            step.slots
        h["ids"][N:n], h["from_device"][N:n], h["positions"][N:n], h["slots"][N:n] = 0, -1, 0, self.pad_slot
        h["sample_rows"][:k], h["sample_rows"][k:] = sample_rows, 0
        h["context_lens"][:B], h["context_lens"][B:] = step.context_lens, 1
        h["query_start"][0], h["query_start"][1:B + 1], h["query_start"][B + 1:] = 0, np.cumsum(step.query_lens), N
        h["block_tables"][:B] = step.block_tables
        h["work"][:self._items(n)] = prefill_work(step.query_lens, step.context_lens, BLOCK_M, self._items(n))
        hidden, = self._replay(n, k)
        return self._logits_and_argmax(hidden)  # eager, on the k rows that sample: not max_batch padded ones


def capture_all(families: list[StepGraphs]) -> dict:
    """Capture every family in one memory pool; returns how many graphs, in how long, in how much memory."""
    start, free_before = time.perf_counter(), torch.cuda.mem_get_info()[0]
    pool = None
    with torch.inference_mode():
        for family in families:
            pool = family.capture(pool)
    torch.cuda.synchronize()
    figures = {"cuda-graphs": sum(len(f.graphs) for f in families),
               "cuda-graph-capture-s": round(time.perf_counter() - start, 2),
               "cuda-graph-mib": round((free_before - torch.cuda.mem_get_info()[0]) / 2 ** 20)}
    log.info("captured %d CUDA graphs in %.1f s, %d MiB", *figures.values())
    return figures
