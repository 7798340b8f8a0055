"""BATCH_INVARIANT on the GPU path ("triton-invariant": every row through the Triton prefill kernel, the products
through engine/triton_linear.py): 64 seeded sampled requests get bitwise the same tokens alone (prefix caching
off) and inside a crowd that arrives as a Poisson process (caching on: hits and misses), in bf16 on CUDA graphs
with steps overlapped, under every policy, chunked and preempted. The model has gpt2-medium's layer shapes (4
layers): products over K = 1,024 and 4,096, where cuBLAS would pick its tiles and split K by the number of rows.
On a CPU the same path runs under Triton's interpreter, whose products (numpy's) are not row-invariant: there
only its correctness is checked (greedy tokens equal HF's)."""
import random

import pytest
import torch

pytest.importorskip("triton")  # conftest.py runs it under the interpreter on a CPU
from batching import BatchingManager, make_policy  # noqa: E402
from conftest import assert_nothing_leaked, make_manager, request, run_until_idle  # noqa: E402
from engine.loader import from_pretrained  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from engine.triton_linear import invariant_linear  # noqa: E402
from test_batch_invariant import SAMPLED, seeded, tokens_and_logprobs  # noqa: E402
from test_loader import IDS, prefill_logits  # noqa: E402
from test_oracle import hf_greedy  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_invariant_product_is_f_linear_with_and_without_a_bias_and_with_the_gelu():
    from engine.triton_linear import invariant_gelu_product
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(37, 80, generator=g), torch.randn(100, 80, generator=g), torch.randn(100, generator=g)
    x, weight, bias = x.to(device), weight.to(device), bias.to(device)
    for b in (bias, None):
        torch.testing.assert_close(invariant_linear(x, weight, b), torch.nn.functional.linear(x, weight, b), rtol=1e-4,
                                   atol=1e-4)
    gelu = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")
    torch.testing.assert_close(invariant_gelu_product(x, weight, bias), gelu, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreted kernels: the CPU's check")
def test_interpreted_the_gpu_mode_gives_the_reference_logits_and_hf_greedy_tokens(tiny_model_dir, tiny_hf_model):
    """Interpreted Triton is slow (the vocab projection alone is ~800 programs a step): one prefill's logits, and a
    short prompt's greedy tokens (its decodes through the prefill kernel too)."""
    invariant = prefill_logits(from_pretrained(tiny_model_dir), IDS, attention="triton-invariant")
    torch.testing.assert_close(invariant, prefill_logits(from_pretrained(tiny_model_dir), IDS), rtol=1e-4, atol=1e-4)
    manager = make_manager(tiny_model_dir, "dynamic", attention="triton-invariant")
    r = manager.enqueue(request([464, 318], 2))
    run_until_idle(manager)
    assert r.output_ids == hf_greedy(tiny_hf_model, [464, 318], 2)


def gpu_manager(model_dir: str, policy: str, max_step_tokens: int = 256, prefix_caching: bool = True,
                **kw) -> BatchingManager:
    runner = ModelRunner(from_pretrained(model_dir), torch.device("cuda"), torch.bfloat16, seed=0,
                         attention="triton-invariant", cuda_graphs=True, max_batch=32, prefix_caching=prefix_caching,
                         **(dict(block_size=16, num_blocks=1024) | kw))
    return BatchingManager(runner, make_policy(policy, 32), max_step_tokens, overlap=True)


@pytest.fixture(scope="module")
def medium_shaped_dir(tmp_path_factory) -> str:
    """Random weights in gpt2-medium's layer shapes, 4 layers."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2-medium-shaped")
    GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=16, n_embd=1024, n_positions=1024)).save_pretrained(path)
    return str(path)


def watched(seed: int = 7) -> list[tuple[list[int], int, int]]:
    """(prompt, tokens, seed) of 64 requests: half of them in four groups that share a 40-token prefix (two full
    16-token blocks, cached once the group's first request has been admitted)."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(50257) for _ in range(n)]
    commons = [ids(40) for _ in range(4)]
    prompts = [commons[i % 4] + ids(rng.randint(1, 40)) for i in range(32)] + [ids(rng.randint(1, 80))
                                                                               for _ in range(32)]
    return [(p, rng.randint(4, 24), 1000 + i) for i, p in enumerate(prompts)]


def in_a_poisson_crowd(manager: BatchingManager, work: list, crowd_size: int = 64, per_step: float = 1.5,
                       seed: int = 9) -> list:
    """The watched requests and a crowd of unseeded ones in a random order, arriving as a Poisson process of
    `per_step` requests a step on average (the engine stepped in between): each watched request joins a running
    batch of its own mix, with prompts being prefilled beside its decodes."""
    rng = random.Random(seed)
    crowd = [([rng.randrange(50257) for _ in range(rng.randint(1, 120))], rng.randint(1, 40))
             for _ in range(crowd_size)]
    arrivals = list(enumerate(work)) + [(None, c) for c in crowd]
    rng.shuffle(arrivals)
    out, clock, steps = [None] * len(work), 0.0, 0
    for i, item in arrivals:
        clock += rng.expovariate(per_step)
        while steps < clock:
            manager.step()
            steps += 1
        if i is None:
            manager.enqueue(request(*item, **SAMPLED))
        else:
            out[i] = manager.enqueue(seeded(*item))
    run_until_idle(manager)
    assert all(r.finish_reason == "length" for r in out), [(r.finish_reason, r.error) for r in out]
    assert_nothing_leaked(manager)
    return out


@pytest.fixture(scope="module")
def alone_on_gpu(medium_shaped_dir) -> list[tuple[list[int], list[float]]]:
    """Each watched request's tokens and logprobs with the engine to itself, its whole prompt computed (no cache)."""
    manager = gpu_manager(medium_shaped_dir, "nobatch", prefix_caching=False)
    out = []
    for p, n, seed in watched():
        r = manager.enqueue(seeded(p, n, seed))
        run_until_idle(manager)
        out.append(tokens_and_logprobs(r))
    return out


@needs_cuda
@pytest.mark.parametrize("policy", ["nobatch", "static", "dynamic"])
def test_on_the_gpu_a_seeded_request_gets_the_same_tokens_alone_and_in_a_poisson_crowd(medium_shaped_dir,
                                                                                       alone_on_gpu, policy):
    manager = gpu_manager(medium_shaped_dir, policy)
    crowded = in_a_poisson_crowd(manager, watched())
    assert [tokens_and_logprobs(r) for r in crowded] == alone_on_gpu
    assert sum(r.cached_tokens > 0 for r in crowded) >= 16  # cache hits among them, the same tokens as misses


@needs_cuda
def test_on_the_gpu_the_same_tokens_chunked_and_preempted(medium_shaped_dir, alone_on_gpu):
    manager = gpu_manager(medium_shaped_dir, "dynamic", max_step_tokens=48, block_size=4, num_blocks=160)
    crowded = in_a_poisson_crowd(manager, watched(), crowd_size=24, per_step=3.0)
    assert [tokens_and_logprobs(r) for r in crowded] == alone_on_gpu
    assert manager.scheduler.num_preemptions > 0 and any(r.cached_tokens for r in crowded)


@needs_cuda
@pytest.mark.parametrize("k, n, gelu", [(1024, 3072, False), (4096, 1024, False), (1024, 4096, True),
                                        (1024, 50304, False)])
def test_on_the_gpu_a_row_of_the_invariant_product_has_the_same_bits_for_any_number_of_rows(k, n, gelu):
    """Across the tilings' row limits (64, 512) and past them: each row is bitwise the row computed alone."""
    from engine.triton_linear import invariant_gelu_product
    product = invariant_gelu_product if gelu else invariant_linear
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (t.to("cuda", torch.bfloat16) for t in (torch.randn(2048, k, generator=g),
                                                                torch.randn(n, k, generator=g) / k ** 0.5,
                                                                torch.randn(n, generator=g)))
    alone = torch.cat([product(x[i:i + 1], weight, bias) for i in range(130)])
    for rows in (2, 16, 17, 64, 65, 300, 512, 513, 2048):
        assert torch.equal(product(x[:rows], weight, bias)[:130], alone[:rows]), rows


@needs_cuda
def test_on_the_gpu_the_sampler_filters_and_sums_a_row_the_same_alone_and_in_a_batch():
    """top-p's ranking (ties included: bf16 logits) and the cumulative sums the draw searches, bitwise."""
    from engine.sampler import _apply_top_p, row_cumsum
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 50257, generator=g) * 3).to(torch.bfloat16).float().cuda()  # many ties
    top_p = torch.full((37,), 0.9, device="cuda")
    together = _apply_top_p(logits, top_p)
    sums = row_cumsum(torch.softmax(logits, dim=-1).double())
    for b in (0, 5, 36):
        assert torch.equal(_apply_top_p(logits[b:b + 1], top_p[b:b + 1])[0], together[b])
        assert torch.equal(row_cumsum(torch.softmax(logits[b:b + 1], dim=-1).double())[0], sums[b])
