"""GPT-2 weights: an HF name (local HF cache first, then the hub) or local directory in the HF GPT-2 layout
(Conv1D weights transposed on load), a nanoGPT checkpoint, or random weights of a named shape."""
import json
import logging
import math
import os
from dataclasses import fields

import torch
import torch.nn as nn

from model import GPT, GPTConfig, SHAPES

log = logging.getLogger(__name__)


def random_model(name: str, seed: int = 0) -> GPT:
    """Random weights of a named shape (GPT-2's init), for benchmarks and offline demos."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    config = GPTConfig(**SHAPES[name])
    torch.manual_seed(seed)
    model = GPT(config)
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

def from_pretrained(source: str) -> GPT:
    """Load GPT-2 weights from a nanoGPT checkpoint file, a local HF directory, or an HF hub name."""
    if os.path.isfile(source):
        return _from_nanogpt_checkpoint(source)
    if not os.path.isdir(source):
        if source.startswith(("/", ".", "~")) or source.count("/") > 1:  # a path, not a hub name ("org/name")
            raise FileNotFoundError(f"no such file or directory: {source}")
        source = _download_hf(source)
    return _from_hf_dir(source)

def _from_hf_dir(path: str) -> GPT:
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
    model = GPT(config)
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

def _from_nanogpt_checkpoint(path: str) -> GPT:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    known = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in ckpt["model_args"].items() if k in known})
    if ckpt["model_args"].get("bias") is False:
        raise ValueError(f"{path}: nanoGPT checkpoints without biases are not GPT-2 and are not supported")
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}  # torch.compile's prefix
    model = GPT(config)
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith(".attn.bias")})
    return model


def load_model(source: str, weights: str = "auto") -> tuple[GPT, str]:
    """The server's model: returns (model, "pretrained" | "random").

    weights: "pretrained" loads `source` or fails; "random" builds random weights of the shape named `source`;
    "auto" tries pretrained and falls back to random weights with a loud warning."""
    if weights not in ("auto", "pretrained", "random"):
        raise ValueError(f"unknown WEIGHTS {weights!r}; use auto, pretrained or random")
    if weights == "random":
        return random_model(source), "random"
    try:
        return from_pretrained(source), "pretrained"
    except Exception as e:
        if weights == "pretrained" or source not in SHAPES:
            raise
        log.warning("\n%s\n!!! could not load pretrained weights for %s (%s)\n!!! serving RANDOM weights of its "
                    "shape: completions will be gibberish.\n!!! To choose random weights without this warning, set "
                    "WEIGHTS=random; to fail instead, WEIGHTS=pretrained.\n%s", "!" * 100, source, e, "!" * 100)
        return random_model(source), "random"


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
