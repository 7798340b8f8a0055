"""The device, dtype, attention kernels and step overlap that the settings (engine/config.py) name, resolved on
this machine."""
import torch


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


def resolve_max_batch(max_batch: int | None, device: torch.device) -> int:
    """MAX_BATCH, or by default as many as the device runs well at once. A GPU step reads every weight once
    however many sequences share it, and its decode attention is memory-bound, so more sequences per step is more
    tokens/s until the K/V they read dwarfs the weights (H100, gpt2-medium, 128 -> 512: offline 31k -> 38k tok/s,
    Poisson traffic within p99 TTFT 100 ms / TPOT 25 ms from 120 to 240 requests/s, each step still under 6 ms);
    a CPU's step time grows with every row, and 128 keeps its steps short."""
    if max_batch is not None:
        if max_batch < 1:
            raise ValueError(f"MAX_BATCH must be at least 1; got {max_batch}")
        return max_batch
    return 512 if device.type == "cuda" else 128


def resolve_attention(name: str, device: torch.device, batch_invariant: bool = False) -> str:
    """The attention path. BATCH_INVARIANT takes a batch-invariant one: on a GPU, or with ATTENTION=triton,
    "triton-invariant" (the Triton prefill kernel for every row and Triton products whose reduction does not depend
    on the row count, engine/triton_linear.py; on a CPU run by Triton's interpreter), else on a CPU "invariant"
    (plain PyTorch over fixed tiles, engine/attention/invariant.py)."""
    if batch_invariant:
        if name not in ("auto", "invariant", "triton") or (device.type == "cuda" and name == "invariant"):
            raise ValueError(f"BATCH_INVARIANT takes its own attention: leave ATTENTION unset (or triton); "
                             f"got {name!r}")
        return "triton-invariant" if device.type == "cuda" or name == "triton" else "invariant"
    if name == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if name not in ("reference", "triton"):
        raise ValueError(f"unknown ATTENTION {name!r}; use auto, reference or triton")
    return name
