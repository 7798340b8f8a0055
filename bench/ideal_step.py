"""An idealised decode step on a GPU, the practical ceiling beside our engine's step: the same GPT-2 shape with
random weights, a contiguous (B, nh, ctx, hs) KV cache per layer, SDPA, and the whole step captured in one CUDA
graph per batch size. Eager and graph timings both, in ms."""
import time

import torch
import torch.nn.functional as F

from model import GPTConfig


def run(config: GPTConfig, batches: list[int], ctx: int, dtype: torch.dtype) -> dict[int, dict]:
    """eager_ms and graph_ms (or an error) by batch size."""
    L, E, V, H = config.n_layer, config.n_embd, config.vocab_size, config.n_head
    D = E // H
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype) * 0.02
    wte = rand(V, E)
    layers = [dict(qkv=rand(E, 3 * E), proj=rand(E, E), fc=rand(E, 4 * E), fc2=rand(4 * E, E)) for _ in range(L)]
    times = {}
    for B in batches:
        try:
            times[B] = _time_batch(B, ctx, wte, layers, H, D, dtype)
        except torch.OutOfMemoryError as e:
            times[B] = dict(error=repr(e)[:300])
        torch.cuda.empty_cache()
    return times


def _time_batch(B: int, C: int, wte: torch.Tensor, layers: list[dict], H: int, D: int, dtype: torch.dtype) -> dict:
    E = H * D
    k_cache = [torch.randn(B, H, C, D, device=wte.device, dtype=dtype) for _ in layers]
    v_cache = [torch.randn(B, H, C, D, device=wte.device, dtype=dtype) for _ in layers]
    tokens = torch.randint(0, wte.shape[0], (B,), device=wte.device)

    def step():
        h = wte[tokens]
        for w, k, v in zip(layers, k_cache, v_cache):
            q, k_new, v_new = (F.layer_norm(h, (E,)) @ w["qkv"]).split(E, dim=-1)
            k[:, :, -1:] = k_new.view(B, H, 1, D)
            v[:, :, -1:] = v_new.view(B, H, 1, D)
            o = F.scaled_dot_product_attention(q.view(B, H, 1, D), k, v)
            h = h + o.reshape(B, E) @ w["proj"]
            h = h + F.gelu(F.layer_norm(h, (E,)) @ w["fc"], approximate="tanh") @ w["fc2"]
        return (F.layer_norm(h, (E,)) @ wte.t()).argmax(-1)

    side = torch.cuda.Stream()  # CUDA graphs are captured after a warm-up on a side stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = {}
    for name, fn in (("eager_ms", step), ("graph_ms", graph.replay)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        n = 50
        start = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - start) / n * 1e3
    return times
