"""Programmatic dependent launch (PDL, Hopper and later) for the GPU path's Triton kernels.

A decode step at a few rows is a chain of ~250 short kernels, each of which waits for the one before to finish
before its programs are even placed on the SMs. Launched with PDL, a kernel's programs are placed as soon as the
kernel before it has all of its programs running; they wait (`griddepcontrol.wait`) only where they first touch
what that kernel wrote, and a product uses the time before to bring its share of the weights into L2, which no
kernel writes. So every kernel of the GPU path starts with `wait_for_inputs` (before any load of an input or
store of an output), then lets the next kernel be placed. Inside a CUDA graph the launches become programmatic
edges. Kernels of others (cuBLAS, PyTorch) are not launched this way and keep the usual full ordering.

`enabled(device)`: on CUDA devices of compute capability 9.0 and later, not under Triton's interpreter (the CPU
tests), unless PDL=false (read at each launch: a bench's baseline beside it in the same run).
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.config import parse


@functools.cache
def _supported(device: torch.device) -> bool:
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def enabled(device: torch.device) -> bool:
    """Whether kernels launched now on `device` go with PDL (pass it as the kernel's PDL and launch_pdl)."""
    return _supported(device) and parse("PDL", os.environ.get("PDL") or "true", bool)


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Waits until the kernels before have finished and their writes are visible, then lets the next kernel's
    programs be placed (they wait the same way). Every kernel launched with PDL calls it before touching memory
    that an earlier kernel writes or reads."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Asks L2 for the 128-byte lines at `ptrs` without waiting for them (memory no kernel of the step writes)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
