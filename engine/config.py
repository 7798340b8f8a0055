"""The server's settings (environment variables, see README). Plain data, read by every process of a server (the
HTTP ones import no torch); engine/device.py resolves the device, dtype and kernels they name."""
import os
from dataclasses import dataclass


@dataclass
class Settings:
    policy: str = "dynamic"
    engines: int | None = None  # engine processes, each on a GPU of its own; default: one per visible GPU (1 on a CPU)
    model: str = "gpt2-medium"
    served_model_name: str | None = None  # the model id of /v1; MODEL when unset
    weights: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"  # reference | triton; auto: triton on a GPU, reference on a CPU
    cuda_graphs: bool = True  # decode steps replay captured graphs on a GPU
    overlap_steps: str = "auto"  # launch each step while the one before runs; auto: on a GPU
    max_batch: int | None = None  # most sequences in a step; default 512 on a GPU, 128 on a CPU (engine/device.py)
    max_step_tokens: int = 2048
    max_waiting: int = 1024
    kv_cache_gb: float = 2.0  # CPU; on a GPU the cache takes what GPU_MEMORY_UTILIZATION leaves
    kv_blocks: int | None = None  # exact pool size, overrides the two above
    block_size: int = 16
    prefix_caching: bool = True  # share the KV blocks of prompts' common prefixes (engine/kv_cache.py)
    batch_invariant: bool = False  # the same tokens in any batch (attention/invariant.py, triton_linear.py)
    routing_slack_tokens: int = 2048  # several engines: how much busier the one caching a prompt may be (router.py)
    gpu_memory_utilization: float = 0.9
    key: str | None = None
    seed: int | None = None
    data_dir: str = "data"
    max_body_bytes: int = 1 << 20
    health_stall_s: float = 120.0
    stream_interval_ms: float = 0.0  # a stream's text is sent at most this often (0: a token per event)
    check_invariants: bool = False  # check the engine's bookkeeping after every step (tests; costs time)

    @classmethod
    def from_env(cls, env: dict = os.environ) -> "Settings":
        s = cls()
        for f in s.__dataclass_fields__.values():
            raw = env.get(f.name.upper())
            if raw in (None, ""):
                continue
            optional_ints = ("engines", "max_batch", "kv_blocks", "seed")
            kind = type(f.default) if f.default is not None else (int if f.name in optional_ints else str)
            setattr(s, f.name, parse(f.name.upper(), raw, kind))
        return s


def parse(name: str, raw: str, kind: type) -> bool | int | float | str:
    """A setting's text as its type; a ValueError that names the setting if it is not one: a mistyped switch
    (PREFIX_CACHING=flase) must not quietly read as false."""
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false (or 1/0, yes/no, on/off); got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}; got {raw!r}") from None


def env_number(name: str, default: int | float) -> int | float:
    """A number setting read outside Settings (gunicorn's), of its default's type."""
    raw = os.environ.get(name)
    return default if raw in (None, "") else parse(name, raw, type(default))
