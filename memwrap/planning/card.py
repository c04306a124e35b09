"""A budget is the card, not the allocator's `allocated` bytes: what a plan reserves besides the steady-state step.

Measured on one H200 (torch 2.11, Llama-2-7B at a 24 GB cap, batch 8 × 2048): when the default caching allocator
failed it held 2.28 GiB reserved but unallocated beside 19.82 GiB allocated (11.5%); with expandable segments 0.60
GiB beside 21.44 GiB (2.8%). The CUDA context and the cuBLAS/cuDNN workspaces live outside the allocator's counts.

- "cuda context": measured when the model is on an initialized CUDA device (what the device uses beyond this
  process's allocator, `mem_get_info` against `memory_reserved`), else CUDA_CONTEXT_BYTES.
- "allocator headroom": a fraction of the steady-state peak for rounding and fragmentation: HEADROOM_EXPANDABLE with
  expandable segments (memwrap turns them on when PYTORCH_CUDA_ALLOC_CONF is unset; setting that variable, to
  anything, leaves the allocator as the user configured it), HEADROOM_DEFAULT with the default allocator.
A plan for a model on the CPU reserves neither (there is no CUDA context, and the allocator is glibc's).
"""

from __future__ import annotations

import os

import torch

CUDA_CONTEXT_BYTES = 800 * 10**6  # CUDA 12/13 context with lazy module loading (~0.5 GB) + cuBLAS/cuDNN workspaces
HEADROOM_EXPANDABLE = 0.04  # measured 2.8% reserved-but-unused with expandable segments: 4% covers it
HEADROOM_DEFAULT = 0.12  # measured 11.5% with the default allocator: 12% covers it
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def expandable_segments() -> bool:
    """Whether the run will use expandable segments: memwrap's default when the user set no allocator config."""
    conf = os.environ.get(ALLOC_CONF)
    if conf is None:
        return True
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def headroom_fraction() -> float:
    return HEADROOM_EXPANDABLE if expandable_segments() else HEADROOM_DEFAULT


def cuda_context_bytes(device: torch.device | None = None) -> tuple[int, str]:
    """(bytes, how they were found) of the CUDA context and library workspaces on `device`."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            free, total = torch.cuda.mem_get_info(device)
            outside = total - free - torch.cuda.memory_reserved(device)
            if 0 < outside < 8 * 10**9:  # other processes on the card would count too: only a plausible reading
                return int(outside), "measured (mem_get_info beyond this process's allocator)"
        except RuntimeError:
            pass
    return CUDA_CONTEXT_BYTES, "documented constant (memwrap.planning.card)"


def reserves(steady_peak_bytes: int, device: torch.device | None, budget_source: str) -> dict[str, int]:
    """The named parts a plan keeps free beside its steady-state peak (none on a CPU, or when the budget was read as
    free GPU memory minus a margin, which already leaves them)."""
    if device is None or device.type != "cuda" or budget_source != "budget_gb":
        return {}
    context, _ = cuda_context_bytes(device)
    return {"cuda context": context, "allocator headroom": int(steady_peak_bytes * headroom_fraction())}


def enable_expandable_segments() -> bool:
    """Turn on expandable segments for this process's CUDA allocator, unless the user configured it. Returns whether
    memwrap turned them on."""
    if os.environ.get(ALLOC_CONF) is not None or not torch.cuda.is_available():
        return False
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (RuntimeError, AttributeError):
        return False
    return True
