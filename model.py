"""GPT-2 in the shape of nanoGPT, run as one packed forward over many sequences with a paged KV cache.

The model knows nothing of requests or scheduling. Each forward takes a flat list of new tokens (prefill chunks
and single decode tokens of different sequences, concatenated with no padding), their positions, and an
`AttentionMetadata` (engine/attention) that says where each token's K/V goes in the cache (its slot mapping)
and which cached tokens each sequence attends to (block tables, context lengths). Weights are loaded by
engine/loader.py.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import AttentionMetadata, invariant, paged_attention, write_kv


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
    """nn.Linear, or with `batch_invariant` set (GPT.make_batch_invariant) the same product over fixed tiles of
    rows, so that a row's result does not depend on how many rows the step has (engine/attention/invariant.py)."""
    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant.linear(x, self.weight, self.bias) if self.batch_invariant else super().forward(x)


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


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2

    def make_batch_invariant(self) -> None:
        """Run every linear layer over fixed tiles of rows (BATCH_INVARIANT; the attention is the runner's)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.batch_invariant = True

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """idx, pos: (N,) packed new tokens; returns fp32 logits (len(logits_indices), vocab) for the rows that
        sample (all rows when None, as in a decode step), so the large vocab projection runs only where a token
        is drawn."""
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (N, C)
        for block in self.transformer.h:
            x = block(x, meta)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.lm_head(self.transformer.ln_f(x)).float()
