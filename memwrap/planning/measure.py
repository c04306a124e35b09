"""Byte accounting used by tests and benchmarks: saved activations, gradients, optimizer state."""

from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..compress.base import local


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward inside the context (each storage counted once).

    Parameters and buffers saved by reference are excluded: they exist anyway. Tensors that share a storage
    (views, or one x̃ saved by several sibling layers) are counted once, as the allocator holds them once.

    Saved-tensor hooks nest, and only the innermost pair runs. So the meter counts, then hands each tensor on to the
    pair that was innermost when it was entered (a user's `save_on_cpu`, another meter): inside it, the outer hooks
    still do what they did, and an outer meter still counts.
    """

    def __init__(self, model: nn.Module | None = None):
        self._exclude = set()
        if model is not None:
            self._exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
                             if t.device.type != "meta"}
        self._storages: dict[int, int] = {}
        self._ctx = None
        self._outer = None

    def _pack(self, t: torch.Tensor):
        if t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self._exclude and ptr != 0:
                self._storages[ptr] = max(self._storages.get(ptr, 0), st.nbytes())
        return self._outer[0](t) if self._outer is not None else t

    def _unpack(self, packed):
        return self._outer[1](packed) if self._outer is not None else packed

    def __enter__(self):
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # (pack, unpack) or None
        self._outer = top(False) if top is not None else None
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def storage_bytes(tensors) -> int:
    """Bytes the tensors really hold: each storage once (released coords, one broadcast zero, hold almost none)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = local(t).untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients the model's trainable parameters will hold (numel × dtype of the parameter)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params=None) -> int:
    """Bytes of optimizer state tensors (all params, or only those in `params`)."""
    ids = None if params is None else {id(p) for p in params}
    total = 0
    for p, state in optimizer.state.items():
        if ids is not None and id(p) not in ids:
            continue
        total += tensor_bytes(v for k, v in state.items() if isinstance(v, torch.Tensor) and v.ndim > 0)
    return total


class LiveActivationMeter(TorchDispatchMode):
    """Bytes a forward leaves alive for backward: every storage an op inside the context created that is still
    alive when the context exits (parameters and buffers excluded; keep the outputs referenced while reading).

    Unlike saved-tensor hooks this also sees what `torch.utils.checkpoint` keeps (its inputs and arguments), so it
    measures plain, wrapped and recomputed blocks alike.
    """

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self._exclude = set()
        if model is not None:
            self._exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
                             if t.device.type != "meta"}
        self._refs: dict[int, tuple] = {}
        self._model = model
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self._exclude:
                    self._refs[ptr] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        state = {t.untyped_storage().data_ptr() for t in self._projections()}  # memwrap's P: state, made once
        self.bytes = sum(n for ptr, (ref, n) in self._refs.items() if not ref.expired() and ptr not in state)
        self._refs = {}
        return out

    def _projections(self):
        """The random projections P the model's compressed weights cached (on their first forward)."""
        from ..compress.experts import UNITS_ATTR

        if self._model is None:
            return
        for m in self._model.modules():
            for unit in [m] + list(m.__dict__.get(UNITS_ATTR, {}).values()):
                group = getattr(unit, "group", None)
                if group is not None:
                    yield from group.cached_projections()
