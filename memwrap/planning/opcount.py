"""Count the kernels a training step dispatches, and its host syncs: the CPU proxy of a GPU step's launch overhead.

On a GPU, each ATen op that computes something is (at least) one kernel launch, and every op that brings a device
value to the host (`.item()`, `bool(tensor)`, `nonzero`) stalls the CPU until the GPU catches up. A TorchDispatchMode
sees every op the step dispatches on any device, so the counts measured on a CPU are the counts a GPU step launches.
View and metadata ops (views, `detach`, allocations, `set_`) launch nothing and are left out. Ops run inside other ops
(a foreach op's per-tensor fallback on the CPU) are not seen: one dispatched op, as a GPU runs it in one
multi-tensor kernel.

`bytes` is the memory traffic of the kernel ops, as a GPU's memory-bound kernels move it: the bytes of every tensor an
op reads plus every tensor it writes (an in-place op's target both). A step whose kernels are few is memory-bound, and
its time follows these bytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNCS = frozenset({"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2",
                        "unique_dim", "unique_consecutive"})
NO_KERNEL = frozenset({"detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
                       "set_", "resize_", "alias", "_record_function_enter_new", "_record_function_exit",
                       "record_stream"})


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel moves for a tensor: its elements (a broadcast view's one storage element counts once)."""
    if t.numel() and not all(t.stride()) and t.ndim:
        return t.untyped_storage().nbytes() if t.device.type != "meta" else t.element_size()
    return t.numel() * t.element_size()


@dataclass
class OpCounts:
    """Kernel ops and host syncs, by op name."""

    kernels: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)
    bytes: int = 0

    @property
    def n_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())


class CountOps(TorchDispatchMode):
    """`with CountOps() as c: ...` then `c.counts`: the kernel ops and host syncs dispatched inside."""

    def __init__(self):
        super().__init__()
        self.counts = OpCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_SYNCS:
            self.counts.syncs[name] += 1
        elif not func.is_view and name not in NO_KERNEL:
            self.counts.kernels[name] += 1
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            read = [t for t in pytree.tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
                    if isinstance(t, torch.Tensor)]
            self.counts.bytes += sum(_nbytes(t) for t in read) + sum(
                _nbytes(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out
        return func(*args, **(kwargs or {}))


def count_step(model, optimizer, input_ids, labels, steps: int = 3) -> dict[str, OpCounts]:
    """Train `steps` steps and count the last one (the steady state: optimizer state exists, nothing is first):
    {"forward": …, "backward": …, "optimizer": …} (the optimizer's step and zero_grad)."""
    out = {}
    for _ in range(steps):
        out = {}
        with CountOps() as c:
            loss = model(input_ids=input_ids, labels=labels).loss
        out["forward"] = c.counts
        with CountOps() as c:
            loss.backward()
        del loss
        out["backward"] = c.counts
        with CountOps() as c:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out["optimizer"] = c.counts
    return out
