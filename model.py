"""GPT-2 in the shape of nanoGPT, run as one packed forward over many sequences with a paged KV cache.

The model knows nothing of requests or scheduling. Each forward takes a flat list of new tokens (prefill chunks
and single decode tokens of different sequences, concatenated with no padding), their positions, and an
`AttentionMetadata` (engine/attention) that says where each token's K/V goes in the cache (its slot mapping)
and which cached tokens each sequence attends to (block tables, context lengths). Weights are loaded by
engine/loader.py.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import AttentionMetadata, paged_attention, write_kv


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_epsilon: float = 1e-5


SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class Linear(nn.Linear):
    """nn.Linear whose product the runner picks for its device and mode (GPT.use_product): F.linear; on the CPU
    path engine/tiled.py's (a decode's short products spread over every core); under BATCH_INVARIANT one whose
    rows do not depend on how many rows the step has (engine/attention/invariant.py on a CPU,
    engine/triton_linear.py on a GPU)."""
    product = staticmethod(F.linear)  # (x, weight, bias) -> x @ weight.T + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.weight)

    def project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This layer's product with another weight of the same width (the padded vocab projection's)."""
        return self.product(x, weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that also takes the residual add before it: `add_norm(x, y)` returns x + y (the new residual
    stream) and its norm, in one Triton launch with `fused_add` set (GPT.fuse_kernels), two ops otherwise."""
    fused_add = False

    def add_norm(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_add:
            from engine.triton_norm import add_layer_norm  # triton only on this path
            return add_layer_norm(x, y, self.weight, self.bias, self.eps)
        x = x + y
        return x, self(x)


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        # (num_blocks, block_size, nh, hs) each; set by the model runner, which owns the cache memory
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        N, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=1)
        q, k, v = (t.view(N, self.n_head, self.head_dim) for t in (q, k, v))  # (N, nh, hs)
        write_kv(k, v, self.k_cache, self.v_cache, meta)
        y = paged_attention(q, self.k_cache, self.v_cache, meta)
        return self.c_proj(y.reshape(N, C))


def cublaslt_gelu_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x @ weight.T + bias) in one launch: cuBLASLt's GELU_BIAS epilogue, the tanh GELU on CUDA."""
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


class MLP(nn.Module):
    # c_fc's product, bias and GELU in one launch (GPT.fuse_kernels, on CUDA): (x, weight, bias) -> GELU(x W^T + b)
    gelu_product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_product:
            h = self.gelu_product(x, self.c_fc.weight, self.c_fc.bias)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's "gelu_new"
        return self.c_proj(h)


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, h: torch.Tensor, meta: AttentionMetadata,
                next_norm: LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream (N, C); h: ln_1(x). Returns the stream after this block and next_norm of it (the
        next block's ln_1, or ln_f): each residual add goes with the norm after it."""
        x, h = self.ln_2.add_norm(x, self.attn(h, meta))
        return next_norm.add_norm(x, self.mlp(h))


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.padded_head: torch.Tensor | None = None  # lm_head's weight with zero rows after it (pad_vocab)

    def use_product(self, product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
                    gelu_product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                    ) -> None:
        """Every linear layer's product, the vocab projection's too (the CPU's tiled one, BATCH_INVARIANT's, or
        the GPU's for a decode's few rows; the attention is the runner's), and with `gelu_product` c_fc's product
        with its GELU."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.product = product
            elif isinstance(module, MLP) and gelu_product:
                module.gelu_product = gelu_product

    def fuse_kernels(self) -> None:
        """Fewer launches for the GPU path (attention "triton"; a decode step at batch 1 is launch-bound): every
        residual add inside the layer norm after it (engine/triton_norm.py, a program per row), and on CUDA c_fc's
        bias and GELU inside cuBLASLt's product (a later use_product may take its own). Call it once the model is
        on its device: a CPU's _addmm_activation takes the erf GELU, not GPT-2's tanh one (cuBLASLt's epilogue), so
        there the GELU stays apart."""
        on_cuda = self.lm_head.weight.is_cuda
        for module in self.modules():
            if isinstance(module, LayerNorm):
                module.fused_add = True
            elif isinstance(module, MLP) and on_cuda:
                module.gelu_product = cublaslt_gelu_product

    def pad_vocab(self, multiple: int = 64) -> None:
        """Give the vocab projection a row count that is a multiple of `multiple` (50,257 -> 50,304, as nanoGPT
        pads it): a product with an odd-sized output runs on cuBLAS's unaligned kernels (an H100 at batch 128 took
        167 us for what reads 103 MB). The extra rows are zeros whose logits are cut off; the embedding keeps a
        view of the same memory, so the weights stay tied and nothing is held twice."""
        wte = self.transformer.wte.weight
        vocab, width = wte.shape
        padded = torch.zeros(-(-vocab // multiple) * multiple, width, dtype=wte.dtype, device=wte.device)
        padded[:vocab] = wte.data
        wte.data = padded[:vocab]
        self.padded_head = padded

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """idx, pos: (N,) packed new tokens; returns fp32 logits (len(logits_indices), vocab) for the rows that
        sample (all rows when None, as in a decode step), so the large vocab projection runs only where a token
        is drawn."""
        return self.logits(self.hidden(idx, pos, meta, logits_indices))

    def hidden(self, idx: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata,
               logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """The final layer norm's output for the rows that sample (all rows when None): what `logits` projects."""
        blocks = self.transformer.h
        x, h = blocks[0].ln_1.add_norm(self.transformer.wte(idx), self.transformer.wpe(pos))  # (N, C) each
        next_norms = [block.ln_1 for block in blocks][1:] + [self.transformer.ln_f]
        for block, next_norm in zip(blocks, next_norms):
            x, h = block(x, h, meta, next_norm)
        if logits_indices is not None:
            h = h[logits_indices]  # after ln_f, which works row by row: the same rows as selecting before it
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits (rows, vocab) of hidden states."""
        weight = self.lm_head.weight if self.padded_head is None else self.padded_head
        return self.lm_head.project(h, weight)[:, :self.config.vocab_size].float()
