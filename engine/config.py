"""The server's settings (environment variables, see README) and the device and dtype they resolve to."""
import os
from dataclasses import dataclass

import torch


@dataclass
class Settings:
    policy: str = "dynamic"
    model: str = "gpt2-medium"
    served_model_name: str | None = None  # the model id of /v1; MODEL when unset
    weights: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"  # reference | triton; auto: triton on a GPU, reference on a CPU
    cuda_graphs: bool = True  # decode steps replay captured graphs on a GPU
    overlap_steps: str = "auto"  # launch each step while the one before runs; auto: on a GPU
    max_batch: int = 128
    max_step_tokens: int = 2048
    max_waiting: int = 1024
    kv_cache_gb: float = 2.0  # CPU; on a GPU the cache takes what GPU_MEMORY_UTILIZATION leaves
    kv_blocks: int | None = None  # exact pool size, overrides the two above
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    key: str | None = None
    seed: int | None = None
    data_dir: str = "data"
    max_body_bytes: int = 1 << 20
    health_stall_s: float = 120.0
    stream_interval_ms: float = 20.0  # a stream's text is sent at most this often (its first token at once)
    check_invariants: bool = False  # check the engine's bookkeeping after every step (tests; costs time)

    @classmethod
    def from_env(cls, env: dict = os.environ) -> "Settings":
        s = cls()
        for f in s.__dataclass_fields__.values():
            raw = env.get(f.name.upper())
            if raw in (None, ""):
                continue
            kind = type(f.default) if f.default is not None else (int if f.name in ("kv_blocks", "seed") else str)
            if kind is bool:
                value = raw.lower() in ("1", "true", "yes", "on")
            else:
                value = kind(raw)
            setattr(s, f.name, value)
        return s


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={name} but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown DTYPE {name!r}; use auto, {', '.join(dtypes)}")
    return dtypes[name]


def resolve_overlap(name: str, device: torch.device) -> bool:
    """auto: overlap on a GPU only (a CPU step is done when it is launched); true: anywhere (tests)."""
    if name not in ("auto", "true", "false"):
        raise ValueError(f"unknown OVERLAP_STEPS {name!r}; use auto, true or false")
    return device.type == "cuda" if name == "auto" else name == "true"


def resolve_attention(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if name not in ("reference", "triton"):
        raise ValueError(f"unknown ATTENTION {name!r}; use auto, reference or triton")
    return name
