"""The CPU path's own arithmetic: linear layers as batched products over tiles of output features
(engine/tiled.py), and decodes attending in batches of similar context length (engine/attention/reference.py).
Both must give what the plain computation gives; tests/test_oracle.py checks the tokens against HF's."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import tiled
from engine.attention import metadata, reference


@pytest.mark.parametrize("rows", [1, 4, 17, 64, 65])
@pytest.mark.parametrize("features, width", [(2304, 768), (768, 3072), (50304, 64)])
def test_a_tiled_product_is_f_linear(rows, features, width):
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, width, generator=g), torch.randn(features, width, generator=g)
    bias = torch.randn(features, generator=g)
    torch.testing.assert_close(tiled.linear(x, weight, bias), F.linear(x, weight, bias))
    torch.testing.assert_close(tiled.linear(x, weight), F.linear(x, weight))


def test_a_product_whose_features_the_tile_does_not_divide_is_plain():
    x, weight = torch.randn(3, 8), torch.randn(tiled.TILE + 1, 8)
    assert torch.equal(tiled.linear(x, weight), F.linear(x, weight))


def test_decodes_of_one_length_attend_as_one_batch_in_their_order():
    (rows,) = reference.decode_batches(np.array([100, 97, 110, 104]), block_size=16)
    assert rows.tolist() == [0, 1, 2, 3]


def test_decodes_of_spread_lengths_attend_in_batches_within_the_padding_bound():
    context_lens = np.random.default_rng(0).integers(1, 600, 40)
    batches = reference.decode_batches(context_lens, block_size=16)
    assert len(batches) > 1
    assert sorted(np.concatenate(batches).tolist()) == list(range(40))
    for rows in batches:
        blocks = -(-context_lens[rows] // 16)
        assert len(rows) * blocks.max() <= reference.DECODE_PADDING * blocks.sum()


def test_decodes_in_several_batches_and_a_prefill_attend_to_their_own_contexts():
    block_size, nh, hs = 4, 2, 8
    context_lens, query_lens = np.array([3, 40, 9, 25, 12]), np.array([1, 1, 1, 1, 5])
    g = torch.Generator().manual_seed(0)
    width = -(-context_lens.max() // block_size)
    num_blocks = int(len(context_lens) * width)
    tables = np.arange(num_blocks, dtype=np.int32)[torch.randperm(num_blocks, generator=g).numpy()]
    tables = tables.reshape(len(context_lens), width)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, nh, hs, generator=g) for _ in range(2))
    q = torch.randn(int(query_lens.sum()), nh, hs, generator=g)
    step = metadata.pack_step(query_lens, context_lens, tables, block_size)
    meta = metadata.build_metadata(step, torch.device("cpu"))
    meta.reference = reference.plan(step, block_size, torch.device("cpu"))
    assert len(meta.reference.decode_batches) > 1
    out = reference.paged_attention(q, k_cache, v_cache, meta)
    torch.testing.assert_close(out, attend_position_by_position(q, k_cache, v_cache, step), atol=1e-5, rtol=1e-5)


def attend_position_by_position(q, k_cache, v_cache, step: metadata.StepInputs) -> torch.Tensor:
    """Each new token over its own sequence's keys up to its position, gathered slot by slot, in float64."""
    block_size, hs = k_cache.shape[1], k_cache.shape[3]
    rows = np.repeat(np.arange(len(step.query_lens)), step.query_lens)
    out = []
    for row, (seq, position) in enumerate(zip(rows, step.positions)):
        pos = np.arange(position + 1)
        slots = torch.from_numpy(step.block_tables[seq, pos // block_size].astype(np.int64) * block_size
                                 + pos % block_size)
        k, v = (c.view(-1, *c.shape[2:])[slots].double() for c in (k_cache, v_cache))  # (ctx, nh, hs)
        p = (torch.einsum("hd,khd->hk", q[row].double(), k) / math.sqrt(hs)).softmax(-1)
        out.append(torch.einsum("hk,khd->hd", p, v))
    return torch.stack(out).float()
