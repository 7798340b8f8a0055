"""BATCH_INVARIANT on the GPU path ("triton-invariant": every row through the Triton prefill kernel, the products
through engine/triton_linear.py): seeded sampled requests get bitwise the same tokens alone and inside a crowd,
in bf16 on CUDA graphs with steps overlapped, under every policy, chunked, preempted and from the prefix cache.
On a CPU the same path runs under Triton's interpreter, whose products (numpy's) are not row-invariant: there
only its correctness is checked (greedy tokens equal HF's)."""
import pytest
import torch

pytest.importorskip("triton")  # conftest.py runs it under the interpreter on a CPU
from batching import BatchingManager, make_policy  # noqa: E402
from conftest import make_manager, request, run_until_idle  # noqa: E402
from engine.loader import from_pretrained  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from engine.triton_linear import invariant_linear  # noqa: E402
from test_batch_invariant import crowd, in_a_crowd, seeded, targets  # noqa: E402
from test_loader import IDS, prefill_logits  # noqa: E402
from test_oracle import hf_greedy  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_invariant_product_is_f_linear_with_and_without_a_bias():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(37, 80, generator=g), torch.randn(100, 80, generator=g), torch.randn(100, generator=g)
    x, weight, bias = x.to(device), weight.to(device), bias.to(device)
    for b in (bias, None):
        torch.testing.assert_close(invariant_linear(x, weight, b), torch.nn.functional.linear(x, weight, b), rtol=1e-4,
                                   atol=1e-4)


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


def gpu_manager(model_dir: str, policy: str, max_step_tokens: int = 256, **kw) -> BatchingManager:
    runner = ModelRunner(from_pretrained(model_dir), torch.device("cuda"), torch.bfloat16, seed=0,
                         attention="triton-invariant", cuda_graphs=True, max_batch=32,
                         **(dict(block_size=16, num_blocks=512) | kw))
    return BatchingManager(runner, make_policy(policy, 32), max_step_tokens, overlap=True)


@pytest.fixture(scope="module")
def alone_on_gpu(tiny_model_dir) -> list[list[int]]:
    manager = gpu_manager(tiny_model_dir, "nobatch")
    out = []
    for p, n, seed in targets():
        r = manager.enqueue(seeded(p, n, seed))
        run_until_idle(manager)
        out.append(r.output_ids)
    return out


@needs_cuda
@pytest.mark.parametrize("policy", ["nobatch", "static", "dynamic"])
def test_on_the_gpu_a_seeded_request_gets_the_same_tokens_alone_and_in_a_crowd(tiny_model_dir, alone_on_gpu,
                                                                                policy):
    manager = gpu_manager(tiny_model_dir, policy)
    assert [r.output_ids for r in in_a_crowd(manager, targets(), crowd())] == alone_on_gpu


@needs_cuda
def test_on_the_gpu_the_same_tokens_chunked_preempted_and_from_the_cache(tiny_model_dir, alone_on_gpu):
    manager = gpu_manager(tiny_model_dir, "dynamic", max_step_tokens=32, block_size=4, num_blocks=40)
    watched = in_a_crowd(manager, targets(), crowd(n=12))
    assert [r.output_ids for r in watched] == alone_on_gpu
    assert manager.scheduler.num_preemptions > 0 and any(r.cached_tokens for r in watched)
