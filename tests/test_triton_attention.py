"""The Triton paged attention kernels against a plain float64 PyTorch reference. On a CPU they run under
Triton's interpreter (so shapes stay tiny); on CUDA natively, plus the CUDA graph replay the engine relies on."""
import math

import pytest
import torch

pytest.importorskip("triton")  # conftest.py runs it under the interpreter on a CPU
from engine.attention.triton_decode import PROGRAMS_PER_SM, choose_num_splits, paged_decode_attention  # noqa: E402
from engine.attention.metadata import SharedPrefix, block_m_for, prefill_work  # noqa: E402
from engine.attention.triton_prefill import paged_prefill_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # relative and absolute


def paged_cache(context_lens: list[int], block_size: int, nh: int, hs: int, dtype: torch.dtype, seed: int = 0):
    """Random K/V caches with spare blocks, and block tables handing each sequence shuffled block ids; entries past
    a sequence's blocks point at arbitrary (valid) blocks, as the kernels must not read them."""
    g = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / block_size) for n in context_lens]
    W = max(needed) + 1
    num_blocks = sum(needed) + 5
    k_cache = torch.randn(num_blocks, block_size, nh, hs, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, nh, hs, generator=g).to(DEVICE, dtype)
    ids = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(context_lens), W), generator=g)
    for s, n in enumerate(needed):
        tables[s, :n], ids = ids[:n], ids[n:]
    return k_cache, v_cache, tables.to(DEVICE, torch.int32)


def reference(q, k_cache, v_cache, block_tables, context_lens: list[int], query_lens: list[int]) -> torch.Tensor:
    """Each sequence's chunk (its last query_lens[s] tokens) attending causally to its context, gathered position by
    position, in float64."""
    block_size, hs = k_cache.shape[1], k_cache.shape[3]
    outs, row = [], 0
    for s, (ctx, n) in enumerate(zip(context_lens, query_lens)):
        pos = torch.arange(ctx, device=k_cache.device)
        blocks = block_tables[s, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].double()  # (ctx, nh, hs)
        v = v_cache[blocks, pos % block_size].double()
        scores = torch.einsum("qhd,khd->hqk", q[row:row + n].double(), k) / math.sqrt(hs)
        visible = pos[None, :] <= pos[ctx - n:, None]  # (n, ctx)
        p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, v))
        row += n
    return torch.cat(outs)


def decode(context_lens: list[int], block_size=4, nh=3, hs=16, dtype=torch.float32, num_splits=None, seed=0):
    """Run paged_decode_attention on random data; returns (output, float64 reference)."""
    k_cache, v_cache, tables = paged_cache(context_lens, block_size, nh, hs, dtype, seed)
    q = torch.randn(len(context_lens), nh, hs, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    paged_decode_attention(q, k_cache, v_cache, tables, lens, out, 1 / math.sqrt(hs), num_splits=num_splits)
    return out, reference(q, k_cache, v_cache, tables, context_lens, [1] * len(context_lens))


def prefill(query_lens: list[int], context_lens: list[int], block_size=4, nh=3, hs=16, dtype=torch.float32, seed=0):
    """Run paged_prefill_attention on random data; returns (output, float64 reference)."""
    k_cache, v_cache, tables = paged_cache(context_lens, block_size, nh, hs, dtype, seed)
    q = torch.randn(sum(query_lens), nh, hs, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    starts = torch.tensor([0] + query_lens, device=DEVICE).cumsum(0).to(torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    block_m = block_m_for(max(query_lens))
    work = torch.from_numpy(prefill_work(query_lens, context_lens, block_m)).to(DEVICE)
    paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, work, block_m, out, 1 / math.sqrt(hs))
    return out, reference(q, k_cache, v_cache, tables, context_lens, query_lens)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "some output elements were not written"
    tol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


# 1, block_size - 1, block_size and block_size + 1 for the block sizes used below (4, 8, 16), and a longer one
MIXED = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 70]


@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_without_split_matches_reference(block_size):
    assert_close(*decode(MIXED, block_size=block_size, num_splits=1))


@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_split_context_merges_to_reference(num_splits):
    # the short contexts leave later splits empty: their neutral partials must not disturb the merge
    assert_close(*decode(MIXED, block_size=8, num_splits=num_splits))


def test_decode_long_context_with_default_split():
    assert_close(*decode([300, 2, 129], block_size=16, num_splits=None))


def test_decode_head_size_32():
    assert_close(*decode([1, 17, 40], block_size=8, hs=32, num_splits=2))


def test_decode_bf16():
    assert_close(*decode(MIXED, block_size=8, dtype=torch.bfloat16, num_splits=3))


def test_decode_fp16():
    assert_close(*decode([5, 33], block_size=16, dtype=torch.float16, num_splits=1))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_writes_into_strided_output_view(num_splits):
    context_lens, nh, hs = [9, 30], 3, 16
    k_cache, v_cache, tables = paged_cache(context_lens, 8, nh, hs, torch.float32)
    q = torch.randn(2, nh, hs, device=DEVICE)
    wide = torch.full((2, nh, 2 * hs), float("nan"), device=DEVICE)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    paged_decode_attention(q, k_cache, v_cache, tables, lens, wide[..., hs:], 1 / math.sqrt(hs), num_splits=num_splits)
    assert_close(wide[..., hs:], reference(q, k_cache, v_cache, tables, context_lens, [1, 1]))
    assert wide[..., :hs].isnan().all(), "wrote outside the view"


def shared_prefix_decode(context_lens: list[int], members: list[bool], prefix_blocks: int, num_splits: int,
                         prefix_splits: int, block_size=4, nh=3, hs=16, dtype=torch.float32):
    """Decodes where the `members` begin with the same prefix_blocks blocks (member 0's), attended to once through
    the shared-prefix kernel; returns (output, float64 reference)."""
    k_cache, v_cache, tables = paged_cache(context_lens, block_size, nh, hs, dtype)
    first = members.index(True)
    for s, member in enumerate(members):
        if member:
            tables[s, :prefix_blocks] = tables[first, :prefix_blocks]
    q = torch.randn(len(context_lens), nh, hs, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    as_ints = lambda values: torch.tensor(values, dtype=torch.int32, device=DEVICE)
    tokens = prefix_blocks * block_size
    shared = SharedPrefix(table=tables[first, :prefix_blocks].clone(), length=as_ints([tokens]),
                          lens=as_ints([tokens if m else 0 for m in members]), splits=prefix_splits)
    paged_decode_attention(q, k_cache, v_cache, tables, as_ints(context_lens), out, 1 / math.sqrt(hs),
                           num_splits=num_splits, shared=shared)
    return out, reference(q, k_cache, v_cache, tables, context_lens, [1] * len(context_lens))


@pytest.mark.parametrize("num_splits, prefix_splits", [(1, 1), (3, 1), (1, 2)])
def test_decode_with_a_shared_prefix_merges_to_reference(num_splits, prefix_splits):
    # members just past the prefix and far past it; the others attend to their own blocks only; a second prefix
    # partition past the prefix's end is neutral
    members = [True, False, True, True, False, True]
    assert_close(*shared_prefix_decode([13, 7, 40, 17, 30, 70], members, 3, num_splits, prefix_splits))


def test_decode_partitions_after_a_shared_prefix_longer_than_one_partition_cover_each_context_once():
    # partitions of 128 tokens; the 160-token prefix ends inside the second: the first has nothing left, the
    # second starts at the prefix's end, the rest as they were
    lens = [161, 300, 400, 170, 90]
    assert_close(*shared_prefix_decode(lens, [True, True, True, True, False], 10, 4, 1, block_size=16))


def test_decode_with_a_shared_prefix_bf16_over_many_decodes():
    lens = [100 + 3 * i for i in range(70)]  # two tiles of the prefix kernel's decodes
    members = [i % 5 != 2 for i in range(70)]
    assert_close(*shared_prefix_decode(lens, members, 6, 1, 1, block_size=16, dtype=torch.bfloat16))


def test_num_splits_split_small_batches_finely_and_large_ones_not_at_all():
    assert choose_num_splits(256, 16, 512, sm_count=132) == 1  # the batch alone fills the GPU
    assert choose_num_splits(-(-PROGRAMS_PER_SM * 132 // 16), 16, 1024, sm_count=132) == 1  # just enough
    for batch in (1, 8, 16):  # partitions of 128 tokens, so that a short context spreads over the SMs too
        assert choose_num_splits(batch, 16, 1024, sm_count=132) == 1024 // 128
    assert choose_num_splits(1, 16, 100, sm_count=132) == 1  # too short to split


def test_prefill_packed_sequences_of_different_lengths():
    lens = [1, 3, 16, 17, 40]  # a one-token chunk, a chunk within a block, one ending on and one past an edge
    assert_close(*prefill(lens, lens, block_size=4))


def test_prefill_chunk_after_cached_context():
    # chunked prefill: each chunk follows earlier cached tokens; the second starts mid-block
    assert_close(*prefill([8, 11, 1], [24, 29, 50], block_size=8))


def test_prefill_long_chunk_spanning_many_tiles():
    # a 1000-token chunk after 24 cached tokens (mid-block) up to 1024, packed with a short prompt
    assert_close(*prefill([1000, 20], [1024, 20], block_size=16, nh=1))


def test_prefill_head_size_32():
    assert_close(*prefill([5, 30], [12, 30], block_size=8, hs=32))


def test_prefill_bf16():
    assert_close(*prefill([1, 9, 33], [7, 9, 60], block_size=8, dtype=torch.bfloat16))


def test_prefill_fp16():
    assert_close(*prefill([20], [45], block_size=16, dtype=torch.float16))


def test_prefill_rows_have_the_same_bits_whichever_chunk_they_fall_in():
    """BATCH_INVARIANT: a prompt prefilled whole, or in chunks that start anywhere (a step's token budget cuts it),
    gives each query row the same bits. A chunk moves the query tiles, and so which key tiles are masked for a row:
    a masked and an unmasked tile must compute a score alike (the compiler once fused the scaling into exp2's
    subtraction in unmasked tiles only). BLOCK_M fixed, as BATCH_INVARIANT runs the kernel."""
    from engine.attention.metadata import BLOCK_M
    n, nh, hs = 150, 2, 64
    k_cache, v_cache, tables = paged_cache([n], 16, nh, hs, torch.bfloat16)
    q = torch.randn(n, nh, hs, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)

    def attend(lo: int, hi: int) -> torch.Tensor:
        out = torch.full_like(q[lo:hi], float("nan"))
        starts = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEVICE)
        lens = torch.tensor([hi], dtype=torch.int32, device=DEVICE)
        work = torch.from_numpy(prefill_work([hi - lo], [hi], BLOCK_M)).to(DEVICE)
        paged_prefill_attention(q[lo:hi], k_cache, v_cache, tables, starts, lens, work, BLOCK_M, out, hs ** -0.5)
        return out

    chunked = torch.cat([attend(lo, hi) for lo, hi in [(0, 37), (37, 101), (101, n)]])
    assert torch.equal(chunked, attend(0, n))


def test_prefill_writes_into_strided_output_view():
    lens, nh, hs = [6, 10], 3, 16
    k_cache, v_cache, tables = paged_cache(lens, 4, nh, hs, torch.float32)
    q = torch.randn(sum(lens), nh, hs, device=DEVICE)
    wide = torch.full((sum(lens), nh, 2 * hs), float("nan"), device=DEVICE)
    starts = torch.tensor([0, 6, 16], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    work = torch.from_numpy(prefill_work(lens, lens, 16)).to(DEVICE)
    paged_prefill_attention(q, k_cache, v_cache, tables, starts, ctx, work, 16, wide[..., :hs], 1 / math.sqrt(hs))
    assert_close(wide[..., :hs], reference(q, k_cache, v_cache, tables, lens, lens))
    assert wide[..., hs:].isnan().all(), "wrote outside the view"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_replays_in_cuda_graph_with_new_lengths_and_tables(num_splits):
    nh, hs, block_size = 3, 32, 16
    k_cache, v_cache, tables = paged_cache([200, 5, 64, 1], block_size, nh, hs, torch.float32)
    q = torch.randn(4, nh, hs, device=DEVICE)
    out = torch.empty_like(q)
    lens = torch.tensor([200, 5, 64, 1], dtype=torch.int32, device=DEVICE)
    run = lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, out, 1 / math.sqrt(hs), num_splits)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    # the next step: other lengths and other blocks, written in place into the captured tensors
    new_lens = [3, 150, 65, 17]
    tables.copy_(tables.flip(0))
    lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, reference(q, k_cache, v_cache, tables, new_lens, [1] * 4))
