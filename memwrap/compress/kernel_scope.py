"""Hugging Face `kernels`' per-instance function routing, kept outside memwrap's recomputed regions.

With the `kernels` package installed (transformers >= 5.2x requires it), attention classes are decorated with
`use_kernelized_func(apply_rotary_pos_emb, ...)`: every call of their forward writes the instance's private function
wrappers into a context variable, and resets it on return. Inside a region that `torch.utils.checkpoint` recomputes
(a checkpointed layer, a recomputed attention) that write is a side effect the checkpoint would replay, and newer
torch.compile versions refuse it ("HOP: Unsafe side effect ... CompileableContextVar"), breaking the graph.

memwrap designs the write out of its regions instead of asking dynamo to skip it: a region sets, once and outside the
checkpoint, every entry its kernelized modules would set, and those modules (an instance `forward`, removed by
`unwrap`) skip their own write when their entries are already active, so the recomputed body writes nothing. What
runs is unchanged: the same private wrappers are active while the same code runs; only where the write happens moves.
When the region runs again in eager backward (the scope is gone by then), the modules write as they always do.
"""

from __future__ import annotations

import copy
import inspect

from torch import nn

SCOPED_ATTR = "_memwrap_kernel_scoped"  # on a module whose kernels forward memwrap replaced (removed by restore)


def _routing(module: nn.Module) -> tuple[object, list[tuple[str, int]]] | None:
    """(kernels' context variable, [(function name, id of the routed global function)]) for a module whose class
    forward is kernels' `use_kernelized_func` wrapper; None for any other module (or a kernels layout not known)."""
    forward = type(module).forward
    funcs = module.__dict__.get("_kernel_funcs")
    if not isinstance(funcs, dict) or not hasattr(forward, "__wrapped__") or not hasattr(forward, "__globals__"):
        return None
    var = forward.__globals__.get("_ACTIVE_KERNEL_FUNCS")
    try:
        fns = inspect.getclosurevars(forward).nonlocals.get("decorator_args")
    except (TypeError, ValueError):
        return None
    if var is None or not all(hasattr(var, a) for a in ("get", "set", "reset")) or not isinstance(fns, tuple):
        return None
    routed = []
    for fn in fns:
        name = getattr(fn, "__name__", None) or getattr(fn, "kernel_layer_name", None)
        if name not in funcs:
            return None
        routed.append((name, id(fn)))
    return var, routed


class KernelScope:
    """The kernels routing entries of a set of modules (one recomputed region). Holds the modules and the ids of the
    global functions (ints, so a deep copy of the model keeps routing the same globals); no other state."""

    def __init__(self, modules: list[nn.Module]):
        self.var, self.routes = None, []
        for module in modules:
            found = _routing(module)
            if found is not None:
                self.var = found[0]
                self.routes += [(module, name, fn_id) for name, fn_id in found[1]]

    def __bool__(self) -> bool:
        return bool(self.routes)

    def __deepcopy__(self, memo):  # the context variable is kernels' global: a copy of the model routes through it too
        new = KernelScope.__new__(KernelScope)
        new.var, new.routes = self.var, copy.deepcopy(self.routes, memo)
        return new

    def _entries(self) -> dict:
        out = {}
        for module, name, fn_id in self.routes:  # what kernels' own forward would write for this module
            wrapper = module._kernel_funcs[name]
            out[fn_id] = (wrapper, wrapper.forward.__func__)
        return out

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) with these entries active; writes the context variable only if some are not yet."""
        if not self.routes:
            return fn(*args, **kwargs)
        active = self.var.get() or {}
        entries = self._entries()
        if all(_same(active.get(k), v) for k, v in entries.items()):
            return fn(*args, **kwargs)
        token = self.var.set({**active, **entries})
        try:
            return fn(*args, **kwargs)
        finally:
            self.var.reset(token)


def _same(a, b) -> bool:
    return a is not None and a[0] is b[0] and a[1] is b[1]


def unrouted_forward(module: nn.Module):
    """The module's class forward without kernels' routing write (the class's own forward for any other module), as
    a plain function of (module, *args) found once, at wrap time."""
    forward = type(module).forward
    return forward.__wrapped__ if _routing(module) is not None else forward


class ScopedForward:
    """The instance `forward` of a kernelized module inside a recomputed region: its own routing, written only when
    the region has not already made it active."""

    def __init__(self, module: nn.Module):
        self.module, self.inner = module, unrouted_forward(module)
        self.scope = KernelScope([module])

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.inner.__get__(self.module))

    def __call__(self, *args, **kwargs):
        return self.scope.run(self.inner, self.module, *args, **kwargs)


def install_nested(region: nn.Module) -> None:
    """Give each kernelized module strictly inside `region` a ScopedForward (unless it has an instance forward)."""
    for module in region.modules():
        if module is not region and "forward" not in module.__dict__ and _routing(module) is not None:
            module.forward = ScopedForward(module)
            object.__setattr__(module, SCOPED_ATTR, True)


def restore(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        if module.__dict__.pop(SCOPED_ATTR, None):
            if isinstance(module.__dict__.get("forward"), ScopedForward):
                del module.forward
            count += 1
    return count
