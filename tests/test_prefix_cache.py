"""Prefix caching: the block manager's bookkeeping (names, reference counts, LRU eviction, salts), and the floor:
requests that start from cached blocks -- shared with running requests or left by finished ones, after chunked
prefill, a preemption, with overlapped steps or the Triton kernels -- still get HF's greedy tokens."""
import random

import pytest

from conftest import assert_nothing_leaked, make_manager, request, run_until_idle
from engine import prefix
from engine.kv_cache import BlockManager
from engine.prefix import salt_key
from test_oracle import OVERLAP, hf_greedy

BS = 4  # block size of these tests


def computed(bm: BlockManager, seq_id: int, tokens: list[int]) -> int:
    """Allocate a sequence and name its blocks as if a step had computed all its tokens; its cached tokens."""
    cached = bm.allocate(seq_id, tokens)
    bm.cache_computed(seq_id, tokens, len(tokens))
    bm.check(set(bm.tables))
    return cached


def test_a_shared_prefix_is_shared_block_for_block():
    bm = BlockManager(16, BS)
    system = list(range(100, 110))  # two full blocks and two tokens
    assert computed(bm, 0, system + [1, 2, 3]) == 0
    assert computed(bm, 1, system + [7, 8, 9]) == 8  # the two full blocks of the system prompt
    assert bm.tables[1][:2] == bm.tables[0][:2] and bm.tables[1][2] != bm.tables[0][2]
    assert [bm.ref_counts[b] for b in bm.tables[0][:3]] == [2, 2, 1]
    assert (bm.hit_tokens, bm.queried_tokens) == (8, 26)


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(16, BS)
    prompt = list(range(8))  # exactly two blocks
    computed(bm, 0, prompt)
    assert computed(bm, 1, prompt) == 4  # not 8: the step that computes the last token gives the next one's logits
    assert computed(bm, 2, prompt + [9]) == 8


def test_different_salts_never_share_and_equal_salts_do():
    bm = BlockManager(16, BS)
    tokens = list(range(9))
    assert bm.allocate(0, tokens, salt_key("tenant-a")) == 0
    bm.cache_computed(0, tokens, 9)
    assert bm.allocate(1, tokens) == 0
    assert bm.allocate(2, tokens, salt_key("tenant-b")) == 0
    assert bm.allocate(3, tokens, salt_key("tenant-a")) == 8
    bm.check({0, 1, 2, 3})


def test_released_blocks_stay_cached_and_the_tail_of_a_chain_is_evicted_first():
    bm = BlockManager(6, BS)
    computed(bm, 0, list(range(12)) + [99])  # 4 blocks: 3 full and named (h0 h1 h2), 1 partial
    b0, b1, b2, partial = bm.tables[0]
    bm.free(0)
    assert bm.num_free == 6 and list(bm.cached_free) == [b2, b1, b0]  # cached blocks count as free
    assert partial in bm.free_blocks
    bm.check(set())
    computed(bm, 1, [7] * 12)  # 3 blocks: the 2 never used, the partial one's; nothing evicted
    assert list(bm.cached_free) == [b2, b1, b0]
    computed(bm, 2, [8] * 8)  # 2 more: the least recently released cached blocks, the chain's tail first
    assert list(bm.cached_free) == [b0] and bm.tokens_of_block[b2] == (8, 8, 8, 8)  # b2 now holds [8] * 4
    bm.free(1)
    bm.free(2)
    assert computed(bm, 3, list(range(12)) + [99]) == 4  # h0 is still cached
    bm.check({3})


def test_admission_counts_cached_blocks_as_free_but_not_the_ones_it_revives():
    bm = BlockManager(4, BS)
    computed(bm, 0, list(range(13)))  # all 4 blocks, 3 named
    bm.free(0)
    assert bm.allocate(1, list(range(13))) == 12  # 3 cached + 1 new: fits exactly
    bm.free(1)
    assert bm.allocate(2, list(range(13)) + [1, 2, 3, 4]) is None  # 3 cached + 2 new > 4 blocks
    bm.check(set())
    assert bm.allocate(3, [5] * 16) == 0  # no sharing: evicts what it needs
    bm.check({3})


def test_a_hash_collision_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(prefix, "chain", lambda previous, tokens: 0)  # every block has the same name
    bm = BlockManager(8, BS)
    computed(bm, 0, [1, 2, 3, 4, 5])
    assert computed(bm, 1, [6, 7, 8, 9, 10]) == 0


def test_without_prefix_caching_nothing_is_named_or_shared():
    bm = BlockManager(8, BS, prefix_caching=False)
    computed(bm, 0, list(range(9)))
    assert computed(bm, 1, list(range(9))) == 0
    assert not bm.hash_of_block and bm.queried_tokens == 0


def test_clear_cache_forgets_unheld_blocks_only():
    bm = BlockManager(8, BS)
    computed(bm, 0, list(range(9)))
    computed(bm, 1, list(range(100, 109)))
    bm.free(0)
    bm.clear_cache()
    bm.check({1})
    assert computed(bm, 2, list(range(9))) == 0
    assert computed(bm, 3, list(range(100, 109))) == 8  # still held by sequence 1


# ---- the engine: HF's tokens from cached blocks ----

def shared_workload(seed: int) -> list[tuple[list[int], int]]:
    """Prompts that share a 13-token system prompt (3 full blocks and a bit), one the system prompt alone, one a
    multiple of the block size, two identical."""
    rng = random.Random(seed)
    system = [rng.randrange(50257) for _ in range(13)]
    tail = lambda n: [rng.randrange(50257) for _ in range(n)]
    same = system + tail(6)
    return [(system + tail(3), 9), (system, 5), (system + tail(7), 12), (same, 8), (same, 8),
            (system + tail(11), 4), (tail(5), 6)]


@pytest.fixture(scope="module")
def shared(tiny_hf_model):
    work = shared_workload(seed=3)
    return work, [hf_greedy(tiny_hf_model, p, n) for p, n in work]


def run_in_waves(manager, work: list, waves: int, steps_between: int = 2) -> list:
    """The requests in `waves` groups, each enqueued `steps_between` steps after the one before (later groups find
    blocks that running requests hold, or finished ones left)."""
    size = -(-len(work) // waves)
    reqs = []
    for start in range(0, len(work), size):
        reqs += [manager.enqueue(request(p, n)) for p, n in work[start:start + size]]
        for _ in range(steps_between):
            manager.step()
    run_until_idle(manager)
    assert all(r.finish_reason == "length" for r in reqs)
    assert_nothing_leaked(manager)
    return reqs


@OVERLAP
@pytest.mark.parametrize("policy", ["nobatch", "static", "dynamic"])
def test_cached_prefixes_give_hf_tokens_under_each_policy(tiny_model_dir, shared, policy, overlap):
    work, want = shared
    manager = make_manager(tiny_model_dir, policy, overlap=overlap)
    reqs = run_in_waves(manager, work, waves=3)
    assert [r.output_ids for r in reqs] == want
    assert all(r.cached_tokens >= 12 for r in reqs[3:6])  # the second wave found the system prompt's 3 blocks
    again = run_in_waves(manager, work, waves=1)  # everything from blocks finished requests left
    assert [r.output_ids for r in again] == want
    assert [r.cached_tokens for r in again] == [(len(p) - 1) // 4 * 4 for p, _ in work]


@OVERLAP
@pytest.mark.parametrize("attention", ["reference", "triton"])
def test_cached_prefixes_give_hf_tokens_with_chunks_and_preemption(tiny_model_dir, shared, attention, overlap):
    """A small step budget (prefill chunks after a cached prefix) and a small pool (preemption; a preempted
    request comes back through its own cached blocks); with the GPU path's kernels, interpreted."""
    if attention == "triton":
        pytest.importorskip("triton")
    work, want = shared
    manager = make_manager(tiny_model_dir, "dynamic", num_blocks=14, max_step_tokens=6, attention=attention,
                           overlap=overlap)
    reqs = run_in_waves(manager, work, waves=2, steps_between=3)
    assert [r.output_ids for r in reqs] == want
    assert manager.scheduler.num_preemptions > 0 and sum(r.cached_tokens for r in reqs) > 0


def test_a_conversation_resent_with_its_answer_reuses_the_answer_blocks(tiny_model_dir, tiny_hf_model):
    manager = make_manager(tiny_model_dir)
    first = manager.enqueue(request(list(range(1, 11)), 12))
    run_until_idle(manager)
    turn = list(range(1, 11)) + first.output_ids + [7, 7, 7]
    second = manager.enqueue(request(turn, 6))
    run_until_idle(manager)
    assert second.cached_tokens == 20  # 10 prompt + 10 of the 12 generated tokens: 5 full blocks (the 6th: partial)
    assert second.output_ids == hf_greedy(tiny_hf_model, turn, 6)


def test_prefix_caching_off_gives_the_same_tokens_and_no_hits(tiny_model_dir, shared):
    work, want = shared
    manager = make_manager(tiny_model_dir, "dynamic")
    manager.runner.block_manager.prefix_caching = False
    reqs = run_in_waves(manager, work, waves=3)
    assert [r.output_ids for r in reqs] == want and all(r.cached_tokens == 0 for r in reqs)
