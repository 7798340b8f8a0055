"""Overlapped steps: the engine launches step N+1 before it reads step N's tokens, and step N+1's decodes take
those tokens on the device. What that must not change: tokens (test_oracle.py runs the HF oracle both ways),
sampled draws and logprobs, where a request ends, and what is freed. On a CPU a step is done at launch, so these
tests switch the overlap on by hand; on a GPU it is the default (test_gpu.py)."""
import random

import pytest
import torch

from conftest import assert_nothing_leaked, make_manager, request, run_until_idle, scripted
from engine.device import resolve_overlap
from engine.tokenizer import EOT_TOKEN, encode
from telemetry.timeline import Timeline

SCRIPT = encode("Say hello world now")  # "Say", " hello", " world", " now"


def count_launches(manager) -> list[int]:
    launches, launch = [], manager.runner.launch

    def counted(plan):
        launches.append(len(plan))
        return launch(plan)

    manager.runner.launch = counted
    return launches


def test_sampled_tokens_and_logprobs_are_the_same_overlapped(tiny_model_dir):
    work = [([1, 2, 3], 12, dict(temperature=0.8, top_k=50, seed=1, logprobs=2)),
            ([4, 5], 9, dict(temperature=1.0, top_p=0.9, logprobs=0)),
            ([6], 15, dict(temperature=0, logprobs=1))]

    def generate(overlap: bool) -> list:
        manager = make_manager(tiny_model_dir, "dynamic", overlap=overlap)
        reqs = [manager.enqueue(request(p, n, **kw)) for p, n, kw in work]
        run_until_idle(manager)
        assert_nothing_leaked(manager)
        return [(r.output_ids, [(t.token, t.logprob, t.top_logprobs) for t in r.logprobs]) for r in reqs]

    overlapped = generate(True)
    assert overlapped == generate(False)
    assert [len(ids) for ids, _ in overlapped] == [12, 9, 15]


def test_a_request_at_max_tokens_is_not_scheduled_again_while_its_last_token_is_in_flight(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic", overlap=True)
    launches = count_launches(manager)
    req = manager.enqueue(request([1, 2, 3], 5))
    run_until_idle(manager)
    assert len(req.output_ids) == 5 and len(launches) == 5  # one step per token, none wasted
    assert_nothing_leaked(manager)


def test_a_stop_string_found_a_step_late_drops_the_token_sampled_after_it(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic", overlap=True)
    scripted(manager, SCRIPT)
    launches = count_launches(manager)
    req = manager.enqueue(request([1], 10, stop=["lo wo"]))
    seq = manager.sequence_of(req)
    run_until_idle(manager)
    assert req.finish_reason == "stop" and req.text == "Say hel" and req.output_ids == SCRIPT[:2]
    assert len(launches) == 4  # " now" was sampled while " world" was being read: it is dropped
    assert seq.num_pending == 0
    assert_nothing_leaked(manager)


def test_an_eos_found_a_step_late_drops_the_token_sampled_after_it(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic", overlap=True)
    scripted(manager, [SCRIPT[0], EOT_TOKEN, SCRIPT[1], SCRIPT[2]])
    req = manager.enqueue(request([1], 10, ignore_eos=False))
    run_until_idle(manager)
    assert req.finish_reason == "stop" and req.output_ids == SCRIPT[:1] and req.text == "Say"
    assert_nothing_leaked(manager)


def test_an_abort_while_the_next_step_is_in_flight_frees_everything_and_spares_the_others(tiny_model_dir):
    alone = make_manager(tiny_model_dir, "dynamic")
    other_alone = alone.enqueue(request([4, 5, 6], 12))
    run_until_idle(alone)
    manager = make_manager(tiny_model_dir, "dynamic", overlap=True)
    aborted, other = manager.enqueue(request([1, 2, 3], 30)), manager.enqueue(request([4, 5, 6], 12))
    for _ in range(4):
        manager.step()
    assert manager.sequence_of(aborted).num_pending == 1  # its next token is being sampled
    manager.abort(aborted)
    run_until_idle(manager)
    assert aborted.finish_reason == "abort" and len(aborted.output_ids) < 30
    assert other.output_ids == other_alone.output_ids
    assert_nothing_leaked(manager)


def test_a_decode_fed_on_the_device_takes_the_row_its_own_token_was_sampled_into(tiny_model_dir):
    """Each decode row fed from the device names a row of the runner's `sampled`: the one that holds the token
    its sequence sampled last. Rows of `sampled` count sampling sequences, not plan rows, and they differ when a
    prompt's chunk of one token that is not its last sits among the decodes (it samples nothing)."""
    manager = make_manager(tiny_model_dir, "dynamic", max_batch=4, max_step_tokens=7, overlap=True)
    runner, fed, shifted = manager.runner, [], []
    token_ids = runner._token_ids

    def recorded_token_ids(plan):  # the plan as the runner orders it: one-token rows first
        ids, from_device = token_ids(plan)
        for row, (seq, n) in enumerate(plan):
            if from_device[row] >= 0:
                fed.append((seq, seq.num_computed, int(runner.sampled[from_device[row]])))
        samples = [seq.num_computed + n == len(seq.token_ids) + seq.num_pending for seq, n in plan]
        shifted.append(False in samples and True in samples[samples.index(False):])
        return ids, from_device

    runner._token_ids = recorded_token_ids
    rng = random.Random(1)
    reqs = [manager.enqueue(request([rng.randrange(50257) for _ in range(rng.randint(1, 40))], rng.randint(1, 24)))
            for _ in range(6)]
    run_until_idle(manager)
    assert fed and any(shifted)  # some steps sampled into rows past a row that sampled nothing
    assert all(seq.token_ids[position] == token for seq, position, token in fed)
    assert all(len(r.output_ids) == r.params.max_tokens for r in reqs)


def test_the_engine_thread_overlapped_serves_concurrent_requests(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic", overlap=True)
    manager.start()
    try:
        reqs = [manager.enqueue(request([i + 1, i + 2], 6 + i)) for i in range(5)]
        assert all(r.event.wait(timeout=60) for r in reqs)
    finally:
        manager.stop()
    assert [len(r.output_ids) for r in reqs] == [6, 7, 8, 9, 10]
    assert_nothing_leaked(manager)


def test_the_timeline_records_overlapped_steps_one_after_the_other(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic", overlap=True)
    manager.attach_timeline(Timeline())
    reqs = [manager.enqueue(request([1, 2, 3], n)) for n in (4, 7, 9)]
    run_until_idle(manager)
    steps = manager.timeline.snapshot()["steps"]
    assert len(steps) == manager.steps == 9
    assert sum(s["sampled"] for s in steps) == sum(len(r.output_ids) for r in reqs)
    for before, after in zip(steps, steps[1:]):  # each step counts from the end of the one before: no overlap
        assert after["start"] >= before["start"] + before["duration"] - 2e-6


def test_overlap_steps_is_on_a_gpu_by_default_and_can_be_forced_either_way():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_overlap("auto", gpu) and not resolve_overlap("auto", cpu)
    assert resolve_overlap("true", cpu) and not resolve_overlap("false", gpu)
    with pytest.raises(ValueError, match="unknown OVERLAP_STEPS 'yes'; use auto, true or false"):
        resolve_overlap("yes", cpu)
