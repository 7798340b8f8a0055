"""Policy semantics, observed from the engine: which requests ran together in each step, with steps read as soon
as they run and overlapped (each launched before the one before is read)."""
import pytest
import torch

from batching import make_policy
from conftest import assert_nothing_leaked, make_manager, request, run_until_idle
from engine.config import Settings
from engine.device import resolve_max_batch


def record_steps(manager) -> list[set[int]]:
    """Make the manager log, for every step, the ids of the requests in that step's forward."""
    steps: list[set[int]] = []
    launch = manager.runner.launch

    def logged_launch(plan):
        steps.append({seq.id for seq, _ in plan})
        return launch(plan)

    manager.runner.launch = logged_launch
    return steps


OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["read-at-once", "overlapped"])


def steps_of(steps: list[set[int]], req) -> list[int]:
    return [i for i, ids in enumerate(steps) if req.id in ids]


@OVERLAP
def test_nobatch_runs_one_request_at_a_time(tiny_model_dir, overlap):
    manager = make_manager(tiny_model_dir, "nobatch", overlap=overlap)
    steps = record_steps(manager)
    reqs = [manager.enqueue(request([1, 2, 3], n)) for n in (5, 2, 7)]
    run_until_idle(manager)
    assert all(len(ids) == 1 for ids in steps)
    spans = [steps_of(steps, r) for r in reqs]
    assert [len(s) for s in spans] == [5, 2, 7]  # one prefill step + one step per further token
    assert spans[0][-1] < spans[1][0] and spans[1][-1] < spans[2][0]  # in arrival order, never interleaved
    assert_nothing_leaked(manager)


@OVERLAP
def test_static_batch_admits_nothing_until_longest_member_finishes(tiny_model_dir, overlap):
    manager = make_manager(tiny_model_dir, "static", overlap=overlap)
    steps = record_steps(manager)
    first = [manager.enqueue(request([1, 2, 3], n)) for n in (2, 9, 4)]
    manager.step()
    late = [manager.enqueue(request([4, 5], n)) for n in (3, 3)]
    run_until_idle(manager)
    assert steps[0] == {r.id for r in first}  # the waiting requests formed one batch
    batch_end = max(steps_of(steps, r)[-1] for r in first)
    assert steps_of(steps, first[1])[-1] == batch_end  # the longest member ends the batch
    assert all(steps_of(steps, r)[0] == batch_end + 1 for r in late)  # then the late ones form the next batch
    assert first[0].done and first[0].finish_time < first[1].finish_time  # short members still answer early
    assert_nothing_leaked(manager)


@OVERLAP
def test_dynamic_admits_waiting_requests_at_the_next_step(tiny_model_dir, overlap):
    manager = make_manager(tiny_model_dir, "dynamic", overlap=overlap)
    steps = record_steps(manager)
    long = manager.enqueue(request([1, 2, 3], 12))
    manager.step()
    manager.step()
    joiner = manager.enqueue(request([7, 8, 9, 10], 3))
    manager.step()
    assert steps[2] == {long.id, joiner.id}  # joined the running batch at once
    run_until_idle(manager)
    assert joiner.finish_time < long.finish_time  # and left it before the long one finished
    assert_nothing_leaked(manager)


@OVERLAP
@pytest.mark.parametrize("policy", ["static", "dynamic"])
def test_max_batch_caps_the_running_requests(tiny_model_dir, policy, overlap):
    manager = make_manager(tiny_model_dir, policy, max_batch=3, overlap=overlap)
    steps = record_steps(manager)
    for _ in range(7):
        manager.enqueue(request([1, 2], 4))
    run_until_idle(manager)
    assert max(len(ids) for ids in steps) == 3
    assert_nothing_leaked(manager)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")


@OVERLAP
def test_chunked_prefill_splits_a_long_prompt_across_steps_beside_decodes(tiny_model_dir, overlap):
    manager = make_manager(tiny_model_dir, "dynamic", max_batch=4, max_step_tokens=8, overlap=overlap)
    steps = record_steps(manager)
    decoding = manager.enqueue(request([1, 2], 10))
    manager.step()
    long_prompt = manager.enqueue(request(list(range(100, 130)), 2))  # 30 tokens, 7 per step beside the decode
    run_until_idle(manager)
    prefill_steps = steps_of(steps, long_prompt)
    assert len(prefill_steps) >= 5
    assert all(decoding.id in steps[i] for i in prefill_steps[:4])  # the decode kept running meanwhile
    assert_nothing_leaked(manager)


def test_max_batch_is_512_on_a_gpu_and_128_on_a_cpu_unless_set():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert (resolve_max_batch(None, cpu), resolve_max_batch(None, gpu)) == (128, 512)
    assert resolve_max_batch(Settings.from_env({"MAX_BATCH": "64"}).max_batch, gpu) == 64
    assert Settings.from_env({}).max_batch is None
    with pytest.raises(ValueError, match="MAX_BATCH must be at least 1; got 0"):
        resolve_max_batch(0, cpu)
