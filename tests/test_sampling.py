"""Sampling: the original's multinomial default, greedy, top-k, top-p, seeds and logprobs."""
import pytest
import torch

from conftest import make_manager, request, run_until_idle
from api.validation import InvalidRequest, checked
from engine.params import SamplingParams
from engine.sampler import Sampler


def draw(logits: torch.Tensor, params: SamplingParams, n: int = 4000) -> torch.Tensor:
    sampler = Sampler(torch.device("cpu"), logits.shape[-1], seed=0)
    rows = logits.expand(n, -1)
    return torch.tensor([t.token for t in sampler(rows, [params] * n, list(range(n)), [0] * n)])


def test_default_sampling_follows_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    counts = torch.bincount(draw(logits, SamplingParams()), minlength=4).float()
    assert torch.allclose(counts / counts.sum(), logits.softmax(-1)[0], atol=0.03)


def test_temperature_zero_is_greedy_and_top_k_one_is_too():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert set(draw(logits, SamplingParams(temperature=0), 50).tolist()) == {1}
    assert set(draw(logits, SamplingParams(top_k=1), 50).tolist()) == {1}


def test_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert set(draw(logits, SamplingParams(top_k=2)).tolist()) == {0, 1}
    # softmax: 0.64, 0.24, 0.09, ... -> top_p 0.8 keeps the first two
    assert set(draw(logits, SamplingParams(top_p=0.8)).tolist()) == {0, 1}


def test_a_seeded_request_gets_the_same_tokens_whatever_runs_beside_it(tiny_model_dir):
    alone = make_manager(tiny_model_dir, "dynamic")
    a = alone.enqueue(request([1, 2, 3], 20, temperature=1.0, seed=42))
    run_until_idle(alone)
    crowded = make_manager(tiny_model_dir, "dynamic")
    others = [crowded.enqueue(request([9, 8, 7, i], 15, temperature=1.0)) for i in range(5)]
    b = crowded.enqueue(request([1, 2, 3], 20, temperature=1.0, seed=42))
    run_until_idle(crowded)
    assert a.output_ids == b.output_ids
    assert any(o.output_ids != a.output_ids[:15] for o in others)


def test_logprobs_are_log_softmax_of_the_model_and_rank_the_chosen_greedy_token_first(tiny_model_dir):
    manager = make_manager(tiny_model_dir, "dynamic")
    r = manager.enqueue(request([1, 2, 3], 4, logprobs=3))
    run_until_idle(manager)
    assert len(r.logprobs) == 4
    for tok in r.logprobs:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        assert max(tok.top_logprobs, key=tok.top_logprobs.get) == tok.token
        assert tok.top_logprobs[tok.token] == pytest.approx(tok.logprob)


def test_logprobs_are_the_models_own_distribution_whatever_the_temperature(tiny_model_dir, tiny_hf_model):
    manager = make_manager(tiny_model_dir, "dynamic")
    prompt = [464, 3290, 318]
    r = manager.enqueue(request(prompt, 6, temperature=0.7, seed=11, logprobs=2))
    run_until_idle(manager)
    with torch.no_grad():  # independent: HF's logits for every position of prompt + output
        logits = tiny_hf_model(torch.tensor([prompt + r.output_ids])).logits[0]
    expected = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    for position, tok in enumerate(r.logprobs):
        assert tok.logprob == pytest.approx(expected[position, tok.token].item(), abs=1e-4)
        top = expected[position].topk(2)
        assert list(tok.top_logprobs) == top.indices.tolist()
        assert list(tok.top_logprobs.values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert any(tok.token != max(tok.top_logprobs, key=tok.top_logprobs.get) for tok in r.logprobs)  # sampled


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=2.5), dict(temperature=float("nan")),
                                 dict(top_p=0), dict(top_p=float("inf")), dict(top_k=-1), dict(top_k=50258),
                                 dict(top_k=1 << 63), dict(seed=1 << 64), dict(max_tokens=0), dict(stop=["a"] * 5),
                                 dict(stop=[""]), dict(logprobs=6)])
def test_out_of_range_sampling_values_are_refused_naming_the_field(bad):
    with pytest.raises(InvalidRequest) as e:
        checked(SamplingParams(**bad))
    assert e.value.param == next(iter(bad))


def test_a_vanishing_temperature_is_greedy_and_a_vanishing_top_p_keeps_the_top_token():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert set(draw(logits, SamplingParams(temperature=1e-40), 50).tolist()) == {1}
    assert set(draw(logits, SamplingParams(top_p=1e-50), 50).tolist()) == {1}


def test_logits_past_the_tokenizers_vocabulary_are_never_sampled():
    # a nanoGPT checkpoint pads its vocabulary to 50304: those ids have no text
    logits = torch.zeros(1, 8)
    logits[0, 6:] = 50.0
    sampler = Sampler(torch.device("cpu"), vocab_size=6, seed=0)
    tokens = [t.token for t in sampler(logits.expand(200, -1), [SamplingParams()] * 200, list(range(200)), [0] * 200)]
    assert max(tokens) < 6
    assert sampler(logits, [SamplingParams(temperature=0)], [0], [0])[0].token < 6


def test_draws_depend_only_on_the_seed_and_the_token_index():
    from engine.sampler import uniforms
    a = uniforms([7, 7, 8], [0, 1, 0])
    assert a[0] != a[1] and a[0] != a[2] and ((0 <= a) & (a < 1)).all()
    assert (uniforms([8, 7], [0, 1]) == a[[2, 1]]).all()  # whatever else is drawn beside them


def test_a_seeded_request_gets_the_same_tokens_after_a_preemption(tiny_model_dir):
    alone = make_manager(tiny_model_dir, "dynamic")
    want = alone.enqueue(request([1, 2, 3], 30, temperature=1.0, seed=5))
    run_until_idle(alone)
    # 12 blocks of 4 tokens: the three requests outgrow the pool, the newest is preempted and recomputed
    crowded = make_manager(tiny_model_dir, "dynamic", num_blocks=12)
    for i in range(2):
        crowded.enqueue(request([4, 5, 6, i], 25, temperature=1.0, seed=i))
    got = crowded.enqueue(request([1, 2, 3], 30, temperature=1.0, seed=5))  # the newest: preempted first
    run_until_idle(crowded)
    assert got.num_preemptions > 0
    assert got.output_ids == want.output_ids
