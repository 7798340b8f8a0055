"""The GPU path's fused kernels (GPT.fuse_kernels): the residual add inside the layer norm after it (a Triton kernel;
interpreted on a CPU, so shapes stay tiny) against torch, the fused model's greedy tokens against HF's, and on CUDA
c_fc's bias + GELU inside its product (cuBLASLt's epilogue) against the tanh GELU, and the kernel in a CUDA graph."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # conftest.py runs it under the interpreter on a CPU
from conftest import make_manager, request, run_until_idle  # noqa: E402
from engine.loader import from_pretrained  # noqa: E402
from engine.triton_norm import add_layer_norm  # noqa: E402
from model import MLP, LayerNorm  # noqa: E402
from test_loader import IDS, prefill_logits  # noqa: E402
from test_oracle import hf_greedy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative and absolute


def stream_and_update(N: int, C: int, dtype: torch.dtype, seed: int = 0):
    """A residual stream, a sublayer's output and a norm's weight and bias, off-centre and scaled as a model's are."""
    g = torch.Generator().manual_seed(seed)
    x, y = (3 * torch.randn(N, C, generator=g) + 1).to(DEVICE, dtype), torch.randn(N, C, generator=g).to(DEVICE, dtype)
    weight, bias = (torch.randn(C, generator=g) + 1).to(DEVICE, dtype), torch.randn(C, generator=g).to(DEVICE, dtype)
    return x, y, weight, bias


def assert_add_layer_norm_matches_torch(x, y, weight, bias, total, norm) -> None:
    """The stream is x + y, bit for bit where the kernel's cast to the stream's dtype rounds as torch's does (in
    fp32, and compiled: Triton's interpreter truncates fp32 to bf16); the norm is F.layer_norm's of that stream
    within the dtype's tolerance."""
    tol = TOLERANCE[x.dtype]
    exact = x.dtype == torch.float32 or x.is_cuda
    torch.testing.assert_close(total, x + y, rtol=0 if exact else tol, atol=0 if exact else tol)
    want = F.layer_norm(total, (x.shape[1],), weight, bias, eps=1e-5)
    torch.testing.assert_close(norm, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [48, 100])  # neither a power of two: the kernel masks the tail of its block
def test_add_layer_norm_gives_the_sum_and_torchs_layer_norm_of_it(dtype, C):
    x, y, weight, bias = stream_and_update(5, C, dtype)
    assert_add_layer_norm_matches_torch(x, y, weight, bias, *add_layer_norm(x, y, weight, bias, 1e-5))


def test_a_layer_norm_module_adds_then_norms_the_same_fused_or_not():
    x, y, weight, bias = stream_and_update(3, 100, torch.float32)
    norm = LayerNorm(100).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    plain = norm.add_norm(x, y)
    norm.fused_add = True
    fused = norm.add_norm(x, y)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_the_fused_model_gives_the_reference_paths_logits(tiny_model_dir):
    """A prefill of 8 tokens through the fused model (Triton attention, add + layer norm fused, and on CUDA the
    GELU in c_fc's product) against the unfused model with the plain PyTorch attention, in fp32."""
    fused = prefill_logits(from_pretrained(tiny_model_dir), IDS, DEVICE, attention="triton")
    reference = prefill_logits(from_pretrained(tiny_model_dir), IDS, DEVICE)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


def test_a_padded_vocab_gives_the_same_logits_and_keeps_the_weights_tied(tiny_model_dir):
    """pad_vocab (on every CUDA runner): the product runs over zero rows up to a multiple of 64, cut off after; the
    embedding is a view of the padded weight, so an edit of one is an edit of the other."""
    plain = prefill_logits(from_pretrained(tiny_model_dir), IDS)
    gpt = from_pretrained(tiny_model_dir)
    gpt.pad_vocab()
    vocab = gpt.config.vocab_size
    assert gpt.padded_head.shape[0] % 64 == 0 and gpt.padded_head.shape[0] > vocab
    assert not gpt.padded_head[vocab:].any() and gpt.lm_head.weight is gpt.transformer.wte.weight
    assert gpt.transformer.wte.weight.data_ptr() == gpt.padded_head.data_ptr()
    count = lambda model: sum(p.numel() for p in model.parameters())
    assert count(gpt) == count(from_pretrained(tiny_model_dir))  # tied: held once, as the roofline counts them
    padded = prefill_logits(gpt, IDS)
    assert padded.shape == plain.shape
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreted kernels; on CUDA test_gpu.py compares tokens")
def test_greedy_tokens_of_the_fused_model_equal_hf(tiny_model_dir, tiny_hf_model):
    """A batch mix on the CPU in fp32, Triton kernels interpreted: prompts of 1, 5 and 12 tokens prefilled in one
    step, then their decodes side by side."""
    work = [([464], 4), ([15496, 995, 11, 314, 716], 5), (list(range(1000, 1012)), 3)]
    manager = make_manager(tiny_model_dir, "dynamic", attention="triton")
    assert all(norm.fused_add for norm in manager.runner.model.modules() if isinstance(norm, LayerNorm))
    reqs = [manager.enqueue(request(p, n)) for p, n in work]
    run_until_idle(manager)
    assert [r.output_ids for r in reqs] == [hf_greedy(tiny_hf_model, p, n) for p, n in work]


def test_on_a_cpu_the_gelu_stays_apart_as_addmm_activation_takes_the_erf_gelu_there(tiny_model_dir):
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(4, 16, generator=g), torch.randn(32, 16, generator=g), torch.randn(32, generator=g)
    product = torch.addmm(bias, x, weight.t())
    fused = torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    torch.testing.assert_close(fused, F.gelu(product))  # erf: not GPT-2's "gelu_new"
    assert not torch.allclose(fused, F.gelu(product, approximate="tanh"), rtol=0, atol=1e-5)
    model = from_pretrained(tiny_model_dir)
    model.fuse_kernels()
    assert not any(mlp.gelu_product for mlp in model.modules() if isinstance(mlp, MLP))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's epilogue needs CUDA")
@pytest.mark.parametrize("rows", [1, 8])  # a decode at batch 1, and a few rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_addmm_activation_on_cuda_is_the_tanh_gelu_of_the_product(rows, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(256, 64, generator=g) / 4).to(DEVICE, dtype)  # products mostly within (-4, 4)
    bias = torch.randn(256, generator=g).to(DEVICE, dtype)
    fused = torch._addmm_activation(bias, x, weight.t(), use_gelu=True).float()
    product = torch.addmm(bias.float(), x.float(), weight.float().t())  # in fp32, of the same inputs
    tanh, erf = F.gelu(product, approximate="tanh"), F.gelu(product)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(fused, tanh, rtol=tol, atol=tol)
    if dtype == torch.float32:  # fine enough to tell the two GELUs apart
        assert (fused - erf).abs().max() > 10 * tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_add_layer_norm_replays_in_a_cuda_graph_with_new_rows_in_bf16():
    x, y, weight, bias = stream_and_update(4, 1024, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        add_layer_norm(x, y, weight, bias, 1e-5)  # compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, norm = add_layer_norm(x, y, weight, bias, 1e-5)

    new = stream_and_update(4, 1024, torch.bfloat16, seed=1)  # the next step's rows, written into the inputs
    for captured, fresh in zip((x, y, weight, bias), new):
        captured.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert_add_layer_norm_matches_torch(x, y, weight, bias, total, norm)


@pytest.mark.parametrize("rows, tiling", [(1, None), (5, (16, 32, 64, 4, 4)), (17, (32, 32, 128, 2, 4)),
                                         (3, (16, 32, 64, 3, 4)), (40, (16, 64, 64, 2, 4))])
@pytest.mark.parametrize("gelu", [False, True])
def test_the_triton_product_is_f_linear_then_the_tanh_gelu(rows, tiling, gelu):
    """engine/triton_linear.py: the few-rows tiling (None), and others split over K (3 shares of K=200: the last
    one short and masked; 40 rows in 3 tiles of 16), the partials summed by the last program of each output tile,
    bias and GELU after the sum."""
    from engine import triton_linear
    g = torch.Generator().manual_seed(rows)
    K = 200 if tiling and tiling[3] == 3 else 256
    x, weight, bias = torch.randn(rows, K, generator=g), torch.randn(100, K, generator=g), torch.randn(100, generator=g)
    x, weight, bias = x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)
    tiling = tiling or triton_linear.few_rows_config(rows, 100, K)
    for b in (bias, None):
        want = F.linear(x, weight, b)
        want = F.gelu(want, approximate="tanh") if gelu else want
        for _ in range(2):  # the second launch finds the ticket counters back at zero
            torch.testing.assert_close(triton_linear.linear(x, weight, b, tiling, gelu), want, rtol=1e-4, atol=1e-4)


def test_a_split_product_of_more_tiles_than_ticket_counters_goes_in_launches_of_rows(monkeypatch):
    """A split K takes a ticket counter per output tile: with 4 counters, 40 rows x 100 outputs in 16 x 32 tiles
    (16 tiles) go in three launches of up to 16 rows, each row the same numbers as in one launch."""
    from engine import triton_linear
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(40, 256, generator=g).to(DEVICE), torch.randn(100, 256, generator=g).to(DEVICE),
                       torch.randn(100, generator=g).to(DEVICE))
    tiling = (16, 32, 64, 2, 4)
    whole = triton_linear.linear(x, weight, bias, tiling)
    launches = []
    kernel = triton_linear._linear_kernel

    class CountingKernel:  # the kernel, noting each launch's grid
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_linear, "MAX_TILES", 4)
    monkeypatch.setattr(triton_linear, "_linear_kernel", CountingKernel())
    in_launches = triton_linear.linear(x, weight, bias, tiling)
    assert launches == [(1, 4, 2)] * 3
    assert torch.equal(in_launches, whole)
    torch.testing.assert_close(whole, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)


def test_the_model_on_the_few_rows_products_gives_the_reference_paths_logits(tiny_model_dir):
    """Every product of a few rows through engine/triton_linear.py's few-rows tiling (c_fc's with its GELU); the
    vocab projection's 50,257 columns stay cuBLAS's."""
    from engine import triton_linear
    model = from_pretrained(tiny_model_dir)
    model.use_product(triton_linear.product, triton_linear.gelu_product)
    few_rows = prefill_logits(model, IDS, DEVICE, attention="triton")
    reference = prefill_logits(from_pretrained(tiny_model_dir), IDS, DEVICE)
    torch.testing.assert_close(few_rows, reference, rtol=1e-4, atol=1e-4)
