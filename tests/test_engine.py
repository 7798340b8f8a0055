"""Engine behaviour beyond the oracle: KV accounting on every exit path, failures, aborts, admission, stopping."""
from types import SimpleNamespace

import pytest

from batching import Overloaded, TooLong, admit
from conftest import assert_nothing_leaked, fail_step, make_manager, request, run_until_idle
from engine.tokenizer import EOT_TOKEN


def test_blocks_return_after_preemption_and_requests_still_finish(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic", num_blocks=10, block_size=4)
    reqs = [manager.enqueue(request([1, 2, 3, 4, 5], 30)) for _ in range(4)]
    run_until_idle(manager)
    assert manager.scheduler.num_preemptions > 0
    assert all(len(r.output_ids) == 30 for r in reqs)
    assert_nothing_leaked(manager)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    fail_step(manager, 1, "device on fire")
    failed = [manager.enqueue(request([1, 2], 5)) for _ in range(3)]
    run_until_idle(manager)
    assert all(r.finish_reason == "error" and "device on fire" in r.error and r.event.is_set() for r in failed)
    assert_nothing_leaked(manager)
    ok = manager.enqueue(request([1, 2], 5))
    run_until_idle(manager)
    assert ok.finish_reason == "length"


def test_engine_thread_survives_a_failing_step(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    fail_step(manager, 1, "transient")
    manager.start()
    try:
        bad = manager.enqueue(request([1], 3))
        assert bad.event.wait(30) and bad.finish_reason == "error"
        good = manager.enqueue(request([1], 3))
        assert good.event.wait(30) and good.finish_reason == "length"
        assert manager.alive
    finally:
        manager.stop()


def test_meanwhile_runs_between_launch_and_wait_and_its_errors_are_not_the_steps(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    events = []
    launch = manager.runner.launch

    def logged_launch(plan):
        launched = launch(plan)
        wait = launched.wait
        events.append("launch")
        launched.wait = lambda: events.append("wait") or wait()
        return launched

    manager.runner.launch = logged_launch
    req = manager.enqueue(request([1, 2], 3))
    while manager.step(meanwhile=lambda: events.append("meanwhile")):
        pass
    assert req.finish_reason == "length"
    assert events == ["launch", "meanwhile", "wait"] * 3
    broken = manager.enqueue(request([1, 2], 3))

    def broken_meanwhile():
        raise ConnectionError("a worker's socket")

    with pytest.raises(ConnectionError):  # the caller's failure, raised to the caller
        manager.step(meanwhile=broken_meanwhile)
    assert broken.error is None and not broken.done  # the step's request did not fail for it
    run_until_idle(manager)
    assert broken.finish_reason == "length"
    assert_nothing_leaked(manager)


def test_a_request_failing_after_its_step_ends_alone(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    bad, good = manager.enqueue(request([1, 2], 5)), manager.enqueue(request([3, 4], 5))

    def broken_detokeniser(token: int) -> str:
        raise KeyError(token)

    bad._decoder.push = broken_detokeniser
    run_until_idle(manager)
    assert bad.finish_reason == "error" and "KeyError" in bad.error and bad.event.is_set()
    assert good.finish_reason == "length" and len(good.output_ids) == 5
    assert_nothing_leaked(manager)


def test_stopping_a_running_engine_thread_aborts_what_is_in_flight_on_that_thread(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    manager.start()
    reqs = [manager.enqueue(request([1, 2], 200)) for _ in range(3)]
    manager.stop()
    assert not manager.alive
    assert all(r.finish_reason == "abort" and r.event.is_set() for r in reqs)
    assert_nothing_leaked(manager)


@pytest.mark.parametrize("steps_before_abort", [0, 1, 4])
def test_abort_releases_blocks_whether_waiting_prefilling_or_decoding(tiny_model_dir, steps_before_abort):
    manager = make_manager(tiny_model_dir, "dynamic")
    victim = manager.enqueue(request(list(range(1, 20)), 50))
    other = manager.enqueue(request([1, 2], 8))
    for _ in range(steps_before_abort):
        manager.step()
    manager.abort(victim)
    run_until_idle(manager)
    assert victim.finish_reason == "abort" and victim.event.is_set()
    assert len(victim.output_ids) < 50
    assert other.finish_reason == "length"
    assert_nothing_leaked(manager)


def test_stop_fails_everything_in_flight(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    reqs = [manager.enqueue(request([1, 2], 100)) for _ in range(3)]
    manager.step()
    manager.stop()
    assert all(r.finish_reason == "abort" and r.event.is_set() for r in reqs)
    assert_nothing_leaked(manager)


def test_admission_refuses_a_request_whose_sequences_the_queue_cannot_all_take(tiny_model_dir):
    limits = make_manager(tiny_model_dir, "dynamic", max_waiting=3).limits
    admit([request([1], 2)] * 3, limits, waiting=0)
    with pytest.raises(Overloaded, match="1 requests are already waiting and this one brings 3"):
        admit([request([1], 2)] * 3, limits, waiting=1)


def test_admission_refuses_a_prompt_plus_tokens_over_the_context(tiny_model_dir):
    limits = make_manager(tiny_model_dir, "dynamic").limits
    with pytest.raises(TooLong, match="maximum context length is 1024 tokens") as refused:
        admit([request([1] * 1000, 25)], limits, waiting=0, max_tokens_param="num_tokens")
    assert refused.value.param == "num_tokens"
    with pytest.raises(TooLong, match="your request has 1024 input tokens") as refused:
        admit([request([1] * 1024, 1)], limits, waiting=0)
    assert refused.value.param == "prompt"


def test_admission_refuses_a_request_larger_than_the_whole_kv_pool(tiny_model_dir):
    limits = make_manager(tiny_model_dir, "dynamic", num_blocks=4, block_size=4).limits
    with pytest.raises(TooLong, match="KV cache"):
        admit([request([1] * 10, 10)], limits, waiting=0)


def test_stops_at_eos_unless_told_to_ignore_it(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    probe = manager.enqueue(request([5, 6, 7], 6))
    run_until_idle(manager)
    # make the model's 3rd greedy token the end-of-text token by relabelling it
    third = probe.output_ids[2]
    wte = manager.runner.model.transformer.wte.weight.data
    wte[[third, EOT_TOKEN]] = wte[[EOT_TOKEN, third]]
    stops = manager.enqueue(request([5, 6, 7], 6, ignore_eos=False))
    ignores = manager.enqueue(request([5, 6, 7], 6, ignore_eos=True))
    run_until_idle(manager)
    assert stops.finish_reason == "stop" and stops.output_ids == probe.output_ids[:2]
    assert ignores.finish_reason == "length" and ignores.output_ids[2] == EOT_TOKEN
    assert_nothing_leaked(manager)


def test_stop_string_cuts_the_text_and_finishes(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    probe = manager.enqueue(request([5, 6, 7], 8))
    run_until_idle(manager)
    stop = probe.text[len(probe.text) // 2:][:3]
    cut = manager.enqueue(request([5, 6, 7], 8, stop=[stop]))
    run_until_idle(manager)
    assert cut.finish_reason == "stop"
    assert cut.text == probe.text[:probe.text.find(stop)]
    assert_nothing_leaked(manager)


def test_streamed_deltas_add_up_to_the_text(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    from batching import Inference
    from engine.params import SamplingParams
    inf = Inference("", [5, 6, 7], SamplingParams(max_tokens=12, temperature=0))
    deltas = []
    inf.stream = SimpleNamespace(due=lambda: True, put=deltas.append)
    manager.enqueue(inf)
    run_until_idle(manager)
    assert deltas.pop() is None
    assert "".join(deltas) == inf.text and len(deltas) == 12


def test_graph_buckets_and_the_logits_their_graphs_keep():
    """What the KV pool leaves free on a GPU for the CUDA graphs' outputs (engine/runner.py): one fp32 logits row
    per sequence of each decode bucket, the shared-prefix ones' too (the mixed graphs keep hidden states, a few MB)."""
    from engine.cuda_graphs import batch_buckets, cascade_buckets, kept_logits_bytes, token_buckets
    assert batch_buckets(512)[:8] == [1, 2, 4, 8, 16, 24, 32, 48] and batch_buckets(512)[-2:] == [496, 512]
    assert token_buckets(2048) == [32, 64, 128, 256, 512, 1024, 2048]
    assert kept_logits_bytes(24, 10, False) == 4 * 10 * (1 + 2 + 4 + 8 + 16 + 24)
    assert cascade_buckets(512) == [16, 32, 64, 96, 128, 192, 256, 384, 512] and cascade_buckets(100)[-1] == 100
    assert kept_logits_bytes(24, 10, True) == 4 * 10 * (1 + 2 + 4 + 8 + 16 + 24 + 16 + 24)
