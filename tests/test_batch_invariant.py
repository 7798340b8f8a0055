"""BATCH_INVARIANT: a request gets bitwise the same tokens alone and inside a crowd, under every policy, with its
prompt prefilled whole or in chunks, after a preemption, from the prefix cache or not, with steps overlapped; its
greedy tokens still equal HF's. Seeded sampled requests make this a real check: a draw lands on the other side of
a boundary between two tokens when the logits move in their last bits."""
import random

import pytest

from conftest import assert_nothing_leaked, make_manager, request, run_until_idle
from engine.attention import invariant
from test_oracle import OVERLAP, hf_greedy

SAMPLED = dict(temperature=0.9, top_p=0.95)


def targets(seed: int = 7) -> list[tuple[list[int], int, int]]:
    """(prompt, tokens, seed) of the requests watched: some share a 21-token prefix with each other."""
    rng = random.Random(seed)
    common = [rng.randrange(50257) for _ in range(21)]
    prompts = [common + [rng.randrange(50257) for _ in range(rng.randint(1, 30))] for _ in range(4)]
    prompts += [[rng.randrange(50257) for _ in range(rng.randint(1, 50))] for _ in range(4)]
    return [(p, rng.randint(4, 20), 1000 + i) for i, p in enumerate(prompts)]


def crowd(seed: int = 8, n: int = 24) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(50257) for _ in range(rng.randint(1, 60))], rng.randint(1, 30)) for _ in range(n)]


def seeded(prompt: list[int], n: int, seed: int):
    """A sampled request with its own seed, asking for its tokens' logprobs: the bits of its logits, which a token
    that did not change can hide (a draw far from the edge between two tokens)."""
    return request(prompt, n, seed=seed, logprobs=0, **SAMPLED)


def tokens_and_logprobs(r) -> tuple[list[int], list[float]]:
    return r.output_ids, [t.logprob for t in r.logprobs]


@pytest.fixture(scope="module")
def alone(tiny_model_dir) -> list[tuple[list[int], list[float]]]:
    """Each watched request's tokens and logprobs with the engine to itself: one step for its prompt, then its
    decodes."""
    out = []
    for p, n, seed in targets():
        manager = make_manager(tiny_model_dir, "nobatch", attention="invariant")
        r = manager.enqueue(seeded(p, n, seed))
        run_until_idle(manager)
        out.append(tokens_and_logprobs(r))
    return out


def in_a_crowd(manager, work: list, others: list) -> list:
    """The crowd first, then the watched requests interleaved with more of it over a few steps."""
    watched = []
    for i, (p, n) in enumerate(others):
        manager.enqueue(request(p, n, **SAMPLED))
        if i % 3 == 2 and len(watched) < len(work):
            watched.append(manager.enqueue(seeded(*work[len(watched)])))
            manager.step()
    watched += [manager.enqueue(seeded(*w)) for w in work[len(watched):]]
    run_until_idle(manager)
    assert all(r.finish_reason == "length" for r in watched), [(r.finish_reason, r.error) for r in watched]
    assert_nothing_leaked(manager)
    return watched


@OVERLAP
@pytest.mark.parametrize("policy", ["nobatch", "static", "dynamic"])
def test_a_seeded_request_gets_the_same_tokens_alone_and_in_a_crowd(tiny_model_dir, alone, policy, overlap):
    manager = make_manager(tiny_model_dir, policy, attention="invariant", overlap=overlap)
    assert [tokens_and_logprobs(r) for r in in_a_crowd(manager, targets(), crowd())] == alone


@OVERLAP
def test_the_same_tokens_with_chunked_prefill_preemption_and_cache_hits(tiny_model_dir, alone, overlap):
    """A 7-token step budget cuts every long prompt into chunks; 24 blocks of 4 tokens (any one request fits) run dry; the
    watched requests that share a prefix find it in the cache."""
    manager = make_manager(tiny_model_dir, "dynamic", num_blocks=24, max_step_tokens=7, attention="invariant",
                           overlap=overlap)
    watched = in_a_crowd(manager, targets(), crowd(n=12))
    assert [tokens_and_logprobs(r) for r in watched] == alone
    assert manager.scheduler.num_preemptions > 0 and any(r.cached_tokens for r in watched)


def test_greedy_tokens_still_equal_hf(tiny_model_dir, tiny_hf_model):
    work = [(p, n) for p, n, _ in targets()]
    manager = make_manager(tiny_model_dir, "dynamic", max_step_tokens=9, attention="invariant")
    reqs = [manager.enqueue(request(p, n)) for p, n in work]
    run_until_idle(manager)
    assert [r.output_ids for r in reqs] == [hf_greedy(tiny_hf_model, p, n) for p, n in work]


def test_a_linear_row_does_not_depend_on_the_other_rows():
    import torch
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 32), torch.randn(96), torch.randn(40, 32)
    alone_row = invariant.linear(x[:1], weight, bias)[0]
    assert all(torch.equal(invariant.linear(torch.cat([x[1:m], x[:1]]), weight, bias)[m - 1], alone_row)
               for m in (2, 5, 16, 17, 40))


def test_the_setting_takes_its_own_attention():
    import torch
    from engine.device import resolve_attention
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, batch_invariant=True) == "invariant"
    assert resolve_attention("triton", cpu, batch_invariant=True) == "triton-invariant"  # the GPU's, interpreted
    with pytest.raises(ValueError, match="its own attention"):
        resolve_attention("reference", cpu, batch_invariant=True)
    cuda = torch.device("cuda")
    assert resolve_attention("auto", cuda, batch_invariant=True) == "triton-invariant"
    assert resolve_attention("triton", cuda, batch_invariant=True) == "triton-invariant"
    with pytest.raises(ValueError, match="its own attention"):
        resolve_attention("invariant", cuda, batch_invariant=True)
