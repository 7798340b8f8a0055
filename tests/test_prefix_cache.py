"""Prefix caching: the block manager's bookkeeping (names, reference counts, LRU eviction, salts), and the floor:
requests that start from cached blocks -- shared with running requests or left by finished ones, after chunked
prefill, a preemption, with overlapped steps or the Triton kernels -- still get HF's greedy tokens."""
import concurrent.futures
import random
import time
from dataclasses import dataclass

import numpy as np
import pytest
import requests

from batching import Inference
from conftest import assert_nothing_leaked, fail_step, make_manager, request, run_until_idle, running_server
from engine import prefix
from engine.kv_cache import BlockManager
from engine.params import SamplingParams
from engine.prefix import salt_key
from serving.router import PrefixIndex
from test_oracle import OVERLAP, hf_greedy

BS = 4  # block size of these tests


@dataclass
class Scheduled:
    """A sequence as cache_scheduled reads it."""
    id: int
    token_ids: list[int]
    num_computed: int


def computed(bm: BlockManager, seq_id: int, tokens: list[int]) -> int:
    """Allocate a sequence and name its blocks as if a step had computed all its tokens; its cached tokens."""
    cached = bm.allocate(seq_id, tokens)
    bm.cache_scheduled([(Scheduled(seq_id, tokens, 0), len(tokens))])
    bm.check(set(bm.tables))
    return cached


def test_a_shared_prefix_is_shared_block_for_block():
    bm = BlockManager(16, BS)
    system = list(range(100, 110))  # two full blocks and two tokens
    assert computed(bm, 0, system + [1, 2, 3]) == 0
    assert computed(bm, 1, system + [7, 8, 9]) == 8  # the two full blocks of the system prompt
    assert bm.tables[1][:2] == bm.tables[0][:2] and bm.tables[1][2] != bm.tables[0][2]
    assert [bm.ref_counts[b] for b in bm.tables[0][:3]] == [2, 2, 1]


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
    bm.cache_scheduled([(Scheduled(0, tokens, 0), 9)])
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
    assert not bm.hash_of_block


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


def test_the_prefix_most_decodes_begin_with_is_found_short_of_each_ones_own_last_token(monkeypatch):
    from engine.attention import metadata
    monkeypatch.setattr(metadata, "MIN_SHARING_DECODES", 3)
    monkeypatch.setattr(metadata, "MIN_SHARED_TOKENS", 8)
    tables = np.array([[5, 6, 7, 8], [5, 6, 7, 9], [1, 2, 0, 0], [5, 6, 3, 0], [5, 6, 7, 4]])
    step = metadata.pack_step(np.ones(5, dtype=np.int64), np.array([14, 16, 5, 10, 13]), tables, BS)
    share = metadata.find_shared_prefix(step, BS)
    assert share.table.tolist() == [5, 6] and share.lens.tolist() == [8, 8, 0, 8, 8]  # the 4th diverges at block 3
    tables[3, 2] = 7  # now all four hold 5, 6, 7, but the 4th's context (10 tokens) ends in its 3rd block
    assert len(metadata.find_shared_prefix(step, BS).table) == 2
    step.context_lens[3] = 13  # its last token (its own, being written) is in its 4th block
    assert metadata.find_shared_prefix(step, BS).table.tolist() == [5, 6, 7]
    monkeypatch.setattr(metadata, "MIN_SHARED_TOKENS", 13)
    assert metadata.find_shared_prefix(step, BS) is None  # too short to be worth its launches
    monkeypatch.setattr(metadata, "MIN_SHARED_TOKENS", 8)
    monkeypatch.setattr(metadata, "MIN_SHARING_DECODES", 5)
    assert metadata.find_shared_prefix(step, BS) is None  # too few decodes share it


@OVERLAP
def test_decodes_attending_to_a_shared_prefix_once_give_hf_tokens(tiny_model_dir, shared, overlap, monkeypatch):
    """Cascade attention (engine/attention/triton_shared.py, interpreted): the decodes that begin with the
    system prompt's blocks attend to them together, the others as before."""
    pytest.importorskip("triton")
    from engine.attention import metadata
    monkeypatch.setattr(metadata, "MIN_SHARING_DECODES", 2)  # this workload's few decodes and 3-block prompt
    monkeypatch.setattr(metadata, "MIN_SHARED_TOKENS", 8)
    found = []
    find = metadata.find_shared_prefix
    monkeypatch.setattr(metadata, "find_shared_prefix", lambda *a: found.append(find(*a)) or found[-1])
    work, want = shared
    manager = make_manager(tiny_model_dir, "dynamic", attention="triton", overlap=overlap)
    reqs = run_in_waves(manager, work, waves=1, steps_between=0)
    assert [r.output_ids for r in reqs] == want
    assert sum(f is not None for f in found) >= 3 and max((f.lens > 0).sum() for f in found if f) >= 5


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


# ---- over HTTP: a real server (its engine in a process of its own) ----

def test_a_server_reports_cached_tokens_and_keeps_salted_requests_apart(tiny_model_dir):
    prompt = list(range(1000, 1040))  # 40 tokens: 2 full blocks of 16 can be shared
    with running_server("dynamic", tiny_model_dir) as url:
        def complete(**body) -> dict:
            r = requests.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0, **body}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        cold, warm = complete(), complete()
        assert cold["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert warm["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
        assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
        assert complete(cache_salt="tenant-a")["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert complete(cache_salt="tenant-b")["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert complete(cache_salt="tenant-a")["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
        text = " ".join(["the same system prompt"] * 12)
        answers = [requests.post(url + "/inference", json={"prompt": text, "num_tokens": 2}, timeout=60).json()
                   for _ in range(2)]
        assert answers[0]["cached_tokens"] == 0 and answers[1]["cached_tokens"] > 0
        bad = requests.post(url + "/inference", json={"prompt": "x", "num_tokens": 1, "cache_salt": ""}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"
        metrics = requests.get(url + "/metrics", timeout=30).text
        hits = sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("vllm:prefix_cache_hits_total{"))
        assert hits == 32 * 2 + answers[1]["cached_tokens"]
        stats = requests.get(url + "/stats", timeout=30).json()
        assert stats["prefix-cache"]["hit-tokens"] == hits and 0 < stats["prefix-cache"]["hit-rate"] < 1
        timeline = requests.get(url + "/timeline", timeout=30).json()
        assert sum(s["cached_tokens"] for s in timeline["steps"]) == hits
        assert sorted(r["cached_tokens"] for r in timeline["requests"])[-1] == 32


def test_the_prefix_index_remembers_where_each_chain_of_blocks_went():
    index = PrefixIndex(block_size=4, capacity=6)
    a, b = Inference("", list(range(13)), SamplingParams()), Inference("", list(range(9)) + [50] * 4, SamplingParams())
    assert len(index.names(a)) == 3 and index.longest(index.names(a)) == (None, 0)
    index.sent(index.names(a), engine=1)
    assert index.longest(index.names(a)) == (1, 3)
    assert index.longest(index.names(b)) == (1, 2)  # the first two blocks are a's
    salted = Inference("", list(range(13)), SamplingParams(), cache_salt="x")
    assert index.longest(index.names(salted)) == (None, 0)
    index.sent(index.names(b), engine=0)
    assert index.longest(index.names(a)) == (0, 2)  # its first blocks went to engine 0 last
    index.sent(index.names(salted), engine=1)  # 3 more names: the least recently sent are forgotten
    assert len(index._engine_of) == 6


def test_two_engines_send_a_cached_prompt_where_its_blocks_are_until_that_engine_is_much_busier(tiny_model_dir):
    """A prompt served by engine 0 goes back to it (a hit) while engine 0 has at most ROUTING_SLACK_TOKENS (300)
    more outstanding work than idle engine 1; past that, to engine 1 (a miss: its cache never saw the prompt)."""
    prompt = list(range(2000, 2040))

    def cached_tokens(url: str, n: int) -> int:
        r = requests.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0},
                          timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    with running_server("dynamic", tiny_model_dir, ENGINES=2, WORKERS=1, ROUTING_SLACK_TOKENS=300) as url, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert cached_tokens(url, 2) == 0  # both idle: engine 0
        # 40 + 200 tokens of work each: engine 0 takes the first two, and is then about 480 tokens ahead
        busy = [pool.submit(cached_tokens, url, 200) for _ in range(2)]
        time.sleep(0.05)  # (both sent)
        assert cached_tokens(url, 2) == 0  # engine 1
        assert [f.result() for f in busy] == [32, 32]


@OVERLAP
def test_requests_arriving_together_share_the_prefix_the_first_one_computes(tiny_model_dir, shared, overlap):
    """Blocks are named as a step is planned, so the requests admitted after the first, in the same step, start
    after the system prompt's blocks that the first computes in that step (its K/V written before any attention
    reads it)."""
    work, want = shared
    manager = make_manager(tiny_model_dir, "dynamic", overlap=overlap)
    reqs = run_in_waves(manager, work, waves=1, steps_between=0)
    assert [r.output_ids for r in reqs] == want
    assert [r.cached_tokens for r in reqs][:6] == [0, 12, 12, 12, 16, 12]  # the 2nd "same" shares the 1st's 4th


@OVERLAP
def test_a_failed_step_takes_the_requests_sharing_its_blocks_and_the_cache_forgets_them(tiny_model_dir, shared,
                                                                                         overlap):
    work, want = shared
    (first, n1), (second, n2) = work[2], work[5]  # both begin with the 13-token system prompt
    manager = make_manager(tiny_model_dir, "dynamic", max_step_tokens=16, overlap=overlap)
    fail_step(manager, 1, "device on fire")
    a, b = manager.enqueue(request(first, n1)), manager.enqueue(request(second, n2))
    run_until_idle(manager)
    # a's first chunk (16 tokens) was to compute the system prompt's blocks; b, admitted with no chunk left in
    # that step's budget, counted on them
    assert (a.finish_reason, b.finish_reason) == ("error", "error") and b.cached_tokens == 12
    assert_nothing_leaked(manager)
    again = run_in_waves(manager, [(first, n1), (second, n2)], waves=2)
    assert [r.output_ids for r in again] == [want[2], want[5]]
    assert again[0].cached_tokens == 0  # nothing of the failed step was kept
