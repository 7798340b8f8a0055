"""GPT-2 in the shape of nanoGPT, run as one packed forward over many sequences with a paged KV cache.

The model knows nothing of requests or scheduling. Each forward takes a flat list of new tokens (prefill chunks
and single decode tokens of different sequences, concatenated with no padding), their positions, and an
`AttentionMetadata` that says where each token's K/V goes in the cache (its slot mapping) and which cached
tokens each sequence attends to (block tables, context lengths).

Weights: an HF name or local directory in the HF GPT-2 layout (Conv1D weights transposed on load), a nanoGPT
checkpoint, or random weights of a named shape.
"""
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


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


@dataclass
class PrefillGroup:
    """Prefill chunks of several sequences attending in one call: their keys are gathered by slot from the cache
    and a mask keeps each query to its own sequence's earlier positions."""
    rows: torch.Tensor  # (P,) rows of the chunks' tokens in the packed batch
    key_slots: torch.Tensor  # (K,) cache slots of every context token of the group's sequences
    mask: torch.Tensor  # (P, K) True where the query may attend to the key


# A group's mask covers all of its queries x all of its keys. Sequences join a group while that costs at most
# twice the useful query-key pairs, or while the group is this small anyway: many short prompts take one call,
# long ones are not multiplied by each other.
SMALL_GROUP_PAIRS = 1 << 16


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit: B sequences, N new tokens in all. Built once per step, so no layer has to
    synchronise with the device to read it. Decodes (one new token each) attend as one padded batch over their
    block tables; prefill chunks attend in packed groups."""
    slot_mapping: torch.Tensor  # (N,) flat cache slot for each new token's K/V
    decode_rows: torch.Tensor  # (D,) rows of the decode tokens in the packed batch
    decode_tables: torch.Tensor  # (D, blocks) block ids covering the longest decode context (padded with 0)
    decode_mask: torch.Tensor  # (D, T) True where a key position is inside that sequence's context; T is
    # a whole number of blocks, so attention sees few distinct shapes
    prefill_groups: list[PrefillGroup]
    scratch: dict = field(default_factory=dict)  # buffers the layers of one step reuse

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              slot_mapping: list[int], block_size: int, device: torch.device) -> "AttentionMetadata":
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)
        starts = list(itertools.accumulate(query_lens, initial=0))
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        width = -(-max((context_lens[i] for i in decodes), default=0) // block_size)
        decode_ctx = as_tensor([context_lens[i] for i in decodes])
        tables = as_tensor([(block_tables[i] + [0] * width)[:width] for i in decodes]).view(len(decodes), width)

        groups: list[list[int]] = []
        queries = keys = useful = 0
        for i in (i for i, n in enumerate(query_lens) if n > 1):
            n, ctx = query_lens[i], context_lens[i]
            pairs = (queries + n) * (keys + ctx)
            if groups and pairs <= max(2 * (useful + n * ctx), SMALL_GROUP_PAIRS):
                groups[-1].append(i)
                queries, keys, useful = queries + n, keys + ctx, useful + n * ctx
            else:
                groups.append([i])
                queries, keys, useful = n, ctx, n * ctx

        def prefill_group(seqs: list[int]) -> PrefillGroup:
            rows, q_seq, q_pos, key_slots, k_seq, k_pos = [], [], [], [], [], []
            for j, i in enumerate(seqs):
                n, ctx, table = query_lens[i], context_lens[i], block_tables[i]
                rows.extend(range(starts[i], starts[i] + n))
                q_seq.extend([j] * n)
                q_pos.extend(range(ctx - n, ctx))  # the chunk is the last n tokens of the context
                key_slots.extend(table[p // block_size] * block_size + p % block_size for p in range(ctx))
                k_seq.extend([j] * ctx)
                k_pos.extend(range(ctx))
            q_seq, q_pos, k_seq, k_pos = map(as_tensor, (q_seq, q_pos, k_seq, k_pos))
            mask = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
            return PrefillGroup(as_tensor(rows), as_tensor(key_slots), mask)

        return cls(
            slot_mapping=as_tensor(slot_mapping),
            decode_rows=as_tensor([starts[i] for i in decodes]),
            decode_tables=tables,
            decode_mask=torch.arange(width * block_size, device=device)[None, :] < decode_ctx[:, None],
            prefill_groups=[prefill_group(g) for g in groups],
        )

    def decode_kv(self, cache: torch.Tensor, name: str) -> torch.Tensor:
        """The decodes' cached K or V, gathered block by block into a buffer every layer of the step reuses
        (a fresh allocation per layer costs more than the copy on the CPU). (D, blocks * block_size, nh, hs)."""
        D, W = self.decode_tables.shape
        if name not in self.scratch:
            self.scratch[name] = cache.new_empty((D * W,) + cache.shape[1:])
        out = self.scratch[name]
        torch.index_select(cache, 0, self.decode_tables.flatten(), out=out)
        return out.view(D, W * cache.shape[1], *cache.shape[2:])


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata) -> torch.Tensor:
    """Causal attention of each new token over its own sequence's cached tokens, in plain PyTorch.
    q: (N, nh, hs); caches: (num_blocks, block_size, nh, hs)."""
    out = torch.empty_like(q)
    if len(meta.decode_rows):
        k = meta.decode_kv(k_cache, "k")  # (D, T, nh, hs)
        v = meta.decode_kv(v_cache, "v")
        y = F.scaled_dot_product_attention(q[meta.decode_rows].unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=meta.decode_mask[:, None, None, :])  # (D, nh, 1, hs)
        out[meta.decode_rows] = y.squeeze(2)
    nh, hs = q.shape[1:]
    for group in meta.prefill_groups:
        k = k_cache.view(-1, nh, hs)[group.key_slots].transpose(0, 1)  # (nh, K, hs)
        v = v_cache.view(-1, nh, hs)[group.key_slots].transpose(0, 1)
        y = F.scaled_dot_product_attention(q[group.rows].transpose(0, 1), k, v, attn_mask=group.mask)  # (nh, P, hs)
        out[group.rows] = y.transpose(0, 1)
    return out


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        # (num_blocks, block_size, nh, hs) each; set by the model runner, which owns the cache memory
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        N, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=1)
        q, k, v = (t.view(N, self.n_head, self.head_dim) for t in (q, k, v))  # (N, nh, hs)
        # one write path for prefill and decode
        self.k_cache.view(-1, self.n_head, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        self.v_cache.view(-1, self.n_head, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        y = paged_attention_reference(q, self.k_cache, self.v_cache, meta)
        return self.c_proj(y.reshape(N, C))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """idx, pos: (N,) packed new tokens; returns fp32 logits (len(logits_indices), vocab) for the rows that
        sample, so the large vocab projection runs only where a token is drawn."""
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (N, C)
        for block in self.transformer.h:
            x = block(x, meta)
        x = self.transformer.ln_f(x[logits_indices])
        return self.lm_head(x).float()

    # ---- weights ----

    @classmethod
    def random(cls, name: str, seed: int = 0) -> "GPT":
        """Random weights of a named shape (GPT-2's init), for benchmarks and offline demos."""
        if name not in SHAPES:
            raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
        config = GPTConfig(**SHAPES[name])
        torch.manual_seed(seed)
        model = cls(config)
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in pname or pname.startswith("transformer.ln_f"):
                nn.init.ones_(p)
            elif pname.endswith("c_proj.weight"):  # residual projections, scaled as GPT-2 does
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
            else:
                nn.init.normal_(p, std=0.02)
        return model

    @classmethod
    def from_pretrained(cls, source: str) -> "GPT":
        """Load GPT-2 weights from a nanoGPT checkpoint file, a local HF directory, or an HF hub name."""
        if os.path.isfile(source):
            return cls._from_nanogpt_checkpoint(source)
        if not os.path.isdir(source):
            source = _download_hf(source)
        return cls._from_hf_dir(source)

    @classmethod
    def _from_hf_dir(cls, path: str) -> "GPT":
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        sd_hf = _read_state_dict(path)
        # HF checkpoints name keys with or without the "transformer." prefix, and drop lm_head (tied to wte)
        sd_hf = {k if k.startswith(("transformer.", "lm_head")) else "transformer." + k: v for k, v in sd_hf.items()}
        sd_hf = {k: v for k, v in sd_hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        # HF GPT-2 uses Conv1D modules, whose weights are the transpose of nn.Linear's
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        model = cls(config)
        sd = model.state_dict()
        for k in sd:
            if k == "lm_head.weight":
                continue
            if k not in sd_hf:
                raise KeyError(f"{path}: weight {k} missing from the checkpoint")
            w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
            if w.shape != sd[k].shape:
                raise ValueError(f"{path}: {k} has shape {tuple(w.shape)}, expected {tuple(sd[k].shape)}")
            with torch.no_grad():
                sd[k].copy_(w)
        return model

    @classmethod
    def _from_nanogpt_checkpoint(cls, path: str) -> "GPT":
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        known = {f.name for f in fields(GPTConfig)}
        config = GPTConfig(**{k: v for k, v in ckpt["model_args"].items() if k in known})
        if ckpt["model_args"].get("bias") is False:
            raise ValueError(f"{path}: nanoGPT checkpoints without biases are not GPT-2 and are not supported")
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}  # torch.compile's prefix
        model = cls(config)
        model.load_state_dict({k: v for k, v in state.items() if not k.endswith(".attn.bias")})
        return model


def load_model(source: str, weights: str = "auto") -> tuple[GPT, str]:
    """The server's model: returns (model, "pretrained" | "random").

    weights: "pretrained" loads `source` or fails; "random" builds random weights of the shape named `source`;
    "auto" tries pretrained and falls back to random weights with a loud warning."""
    if weights not in ("auto", "pretrained", "random"):
        raise ValueError(f"unknown WEIGHTS {weights!r}; use auto, pretrained or random")
    if weights == "random":
        return GPT.random(source), "random"
    try:
        return GPT.from_pretrained(source), "pretrained"
    except Exception as e:
        if weights == "pretrained" or source not in SHAPES:
            raise
        log.warning("\n%s\n!!! could not load pretrained weights for %s (%s)\n!!! serving RANDOM weights of its "
                    "shape: completions will be gibberish (WEIGHTS=random says this on purpose)\n%s",
                    "!" * 100, source, e, "!" * 100)
        return GPT.random(source), "random"


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file
        return load_file(st)
    bin_ = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(bin_):
        return torch.load(bin_, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin")


def _download_hf(name: str) -> str:
    """Local HF cache first (no network), then the hub; returns the snapshot directory."""
    from huggingface_hub import snapshot_download
    patterns = ["config.json", "model.safetensors"]
    try:
        return snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    except Exception:
        log.info("%s is not in the local HF cache; asking the hub", name)
        return snapshot_download(name, allow_patterns=patterns)
