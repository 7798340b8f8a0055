"""The floor under every speed-up: greedy tokens equal HF transformers' GPT2LMHeadModel (fp32, CPU, same weights),
for every policy, with concurrent requests of different prompt and output lengths, chunked prefill and
preemption; with steps read as soon as they run, and overlapped (the next step launched before the last is read,
its decodes fed on the device with tokens the host has not seen yet)."""
import random

import numpy as np
import pytest
import torch

from conftest import assert_nothing_leaked, make_manager, request, run_until_idle


@torch.no_grad()
def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation: no cache, nothing shared with our engine."""
    ids = torch.tensor([prompt_ids])
    for _ in range(n):
        next_id = hf_model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def workload(seed: int, n: int = 6) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(50257) for _ in range(rng.randint(1, 40))], rng.randint(1, 24)) for _ in range(n)]


@pytest.fixture(scope="module")
def expected(tiny_hf_model):
    work = workload(seed=1)
    return work, [hf_greedy(tiny_hf_model, p, n) for p, n in work]


def generate_all(manager, work):
    reqs = [manager.enqueue(request(p, n)) for p, n in work]
    run_until_idle(manager)
    assert all(r.finish_reason == "length" for r in reqs)
    assert_nothing_leaked(manager)
    return [r.output_ids for r in reqs]


OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["read-at-once", "overlapped"])


@OVERLAP
@pytest.mark.parametrize("policy", ["nobatch", "static", "dynamic"])
def test_greedy_tokens_equal_hf_for_each_policy(tiny_model_dir, expected, policy, overlap):
    work, want = expected
    manager = make_manager(tiny_model_dir, policy, overlap=overlap)
    assert generate_all(manager, work) == want


@OVERLAP
def test_greedy_tokens_equal_hf_with_chunked_prefill(tiny_model_dir, expected, overlap):
    work, want = expected
    manager = make_manager(tiny_model_dir, "dynamic", max_batch=4, max_step_tokens=7, overlap=overlap)
    assert generate_all(manager, work) == want


@OVERLAP
@pytest.mark.parametrize("policy", ["static", "dynamic"])
def test_greedy_tokens_equal_hf_under_preemption(tiny_model_dir, expected, policy, overlap):
    work, want = expected
    # 16 blocks of 4 tokens hold any one request (<= 64 tokens) but not all of them at once
    manager = make_manager(tiny_model_dir, policy, num_blocks=16, block_size=4, overlap=overlap)
    assert generate_all(manager, work) == want
    assert manager.scheduler.num_preemptions > 0


@OVERLAP
def test_greedy_tokens_equal_hf_with_the_triton_kernels(tiny_model_dir, expected, overlap):
    """The GPU path's attention (interpreted on a CPU): decodes, chunked prefill with prior context, preemption."""
    pytest.importorskip("triton")
    work, want = expected
    manager = make_manager(tiny_model_dir, "dynamic", num_blocks=16, max_step_tokens=7, attention="triton",
                           overlap=overlap)
    assert generate_all(manager, work) == want
    assert manager.scheduler.num_preemptions > 0


@OVERLAP
def test_requests_joining_mid_generation_do_not_change_tokens(tiny_model_dir, expected, overlap):
    work, want = expected
    manager = make_manager(tiny_model_dir, "dynamic", overlap=overlap)
    reqs = []
    for p, n in work:  # one new request every three steps, while the others decode
        reqs.append(manager.enqueue(request(p, n)))
        for _ in range(3):
            manager.step()
    run_until_idle(manager)
    assert [r.output_ids for r in reqs] == want
    assert_nothing_leaked(manager)


def test_engine_thread_gives_hf_tokens_to_concurrent_requests(tiny_model_dir, expected):
    work, want = expected
    manager = make_manager(tiny_model_dir, "dynamic")
    manager.start()
    try:
        reqs = [manager.enqueue(request(p, n)) for p, n in work]
        for r in reqs:
            assert r.event.wait(timeout=60)
    finally:
        manager.stop()
    assert [r.output_ids for r in reqs] == want
    assert_nothing_leaked(manager)


def test_greedy_tokens_equal_hf_when_long_prompts_prefill_in_several_groups(tiny_model_dir, tiny_hf_model):
    from engine.attention import reference
    from engine.attention.metadata import pack_step
    rng = random.Random(7)
    work = [([rng.randrange(50257) for _ in range(rng.randint(150, 250))], 4) for _ in range(4)]
    lens = np.array([len(p) for p, _ in work])
    step = pack_step(lens, lens, np.zeros((4, 64), dtype=np.int32), 4)
    # long prompts are not all multiplied by each other in one mask
    assert len(reference.plan(step, 4, torch.device("cpu")).prefill_groups) > 1
    manager = make_manager(tiny_model_dir, "dynamic", max_step_tokens=2048)
    assert generate_all(manager, work) == [hf_greedy(tiny_hf_model, p, n) for p, n in work]


VICTIM_STATES = {  # a request's state between two steps, as the engine sees it
    "waiting": lambda m, seq: seq in m.scheduler.waiting,
    "prefilling": lambda m, seq: seq in m.scheduler.running and 0 < seq.num_computed < len(seq.prompt_ids),
    "decoding": lambda m, seq: seq in m.scheduler.running and len(seq.output_ids) >= 2,
    "preempted": lambda m, seq: seq in m.scheduler.preempted,
}


@OVERLAP
@pytest.mark.parametrize("state", VICTIM_STATES)
def test_aborting_a_request_in_any_state_leaves_the_others_hf_tokens(tiny_model_dir, expected, state, overlap):
    """Small batches, chunked prefill and a pool too small for everyone: a request aborted while waiting,
    prefilling in chunks, decoding (overlapped: while a step that holds it is in flight) or preempted gives its
    blocks back without touching the survivors' tokens."""
    work, want = expected
    manager = make_manager(tiny_model_dir, "dynamic", max_batch=3, num_blocks=16, block_size=4, max_step_tokens=7,
                           overlap=overlap)
    survivors = [request(p, n) for p, n in work]
    victim = request(list(range(100, 128)), 36)  # 64 tokens: the whole pool, so it is the first preempted
    position = 4 if state == "waiting" else 1
    for seq in survivors[:position] + [victim] + survivors[position:]:
        manager.enqueue(seq)
    sequence, in_flight = manager.sequence_of(victim), False
    while not victim.done:
        assert manager.step(), f"the victim finished without ever {state}"
        if VICTIM_STATES[state](manager, sequence):
            in_flight = manager._unread is not None and sequence in [seq for seq, _ in manager._unread.plan]
            manager.abort(victim)
            manager.step()
    run_until_idle(manager)
    assert victim.finish_reason == "abort"
    assert [r.output_ids for r in survivors] == want
    assert in_flight == (overlap and state in ("prefilling", "decoding"))
    assert_nothing_leaked(manager)
