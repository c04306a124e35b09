"""Count the kernels a training step dispatches, and its host syncs: the CPU proxy of a GPU step's launch overhead.

On a GPU, each ATen op that computes something is (at least) one kernel launch, and every op that brings a device
value to the host (`.item()`, `bool(tensor)`, `nonzero`) stalls the CPU until the GPU catches up. A TorchDispatchMode
sees every op the step dispatches on any device, so the counts measured on a CPU are the counts a GPU step launches.
View and metadata ops (views, `detach`, allocations, `set_`) launch nothing and are left out. Ops run inside other ops
(a foreach op's per-tensor fallback on the CPU) are not seen: one dispatched op, as a GPU runs it in one
multi-tensor kernel.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNCS = frozenset({"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2",
                        "unique_dim", "unique_consecutive"})
NO_KERNEL = frozenset({"detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
                       "set_", "resize_", "alias", "_record_function_enter_new", "_record_function_exit",
                       "record_stream"})


@dataclass
class OpCounts:
    """Kernel ops and host syncs, by op name."""

    kernels: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)

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
