"""After every optimizer step: W ← W·(1 − lr·wd) + lift(coords), coords ← 0, P refreshed every τ steps.

Any torch.optim.Optimizer that holds `coords` gets this through one optimizer step post-hook. It is
registered when the first model is wrapped and removed when the last wrapped layer is unwrapped, so
importing memwrap changes nothing and an unwrapped process carries no hook. Optimizers that do the merge
themselves (memwrap's own) set `memwrap_owns_merge = True` and are skipped.

The step count that drives refreshes lives in the optimizer's own state (`state[coords]["memwrap_step"]`,
a plain int), so `optimizer.load_state_dict` restores it and a resumed run regenerates the same P.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .base import CompressedWeight, local

_LAYERS: weakref.WeakSet = weakref.WeakSet()  # every live compressed module (linear or experts)
_HOOK = None  # (post-hook handle, pre-hook handle) while any compressed module is alive
MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")  # first-moment states carried into a refreshed subspace


def register(module) -> None:
    global _HOOK
    _LAYERS.add(module)
    if _HOOK is None:
        _HOOK = (register_optimizer_step_post_hook(_after_step), register_optimizer_step_pre_hook(_before_step))


def unregister(module) -> None:
    global _HOOK
    _LAYERS.discard(module)
    if not len(_LAYERS) and _HOOK is not None:
        for handle in _HOOK:
            handle.remove()
        _HOOK = None


def hook_installed() -> bool:
    return _HOOK is not None


def units_of(model) -> list:
    """Every compressed unit of a model: CompressedLinear modules and fused-experts units, in module order."""
    out = []
    for m in model.modules():
        if isinstance(m, CompressedWeight):
            out.append(m)
        out.extend(getattr(m, "_memwrap_experts", {}).values())  # memwrap.compress.experts.UNITS_ATTR
    return out


def layers_by_coords() -> dict[int, object]:
    """id(coords parameter) -> module, rebuilt on each call (FSDP2 replaces parameters with DTensors)."""
    return {id(m.coords): m for m in list(_LAYERS)}


def carry(state_tensor: torch.Tensor, t: torch.Tensor) -> None:
    """In place: subspace coordinates (…, r) under the old P -> the nearest ones under the new P."""
    s = local(state_tensor)
    s.copy_((s.float() @ t.to(s.device)).to(s.dtype))


def completed_steps(optimizer, p) -> int | None:
    """Optimizer steps already applied to coords `p` (None if the optimizer has no memwrap count for it)."""
    state = optimizer.state.get(p)
    if not state:
        return None
    if getattr(optimizer, "memwrap_owns_merge", False):
        step = state.get("step")
        return None if step is None else int(step)
    step = state.get("memwrap_step")
    return None if step is None else int(step)


def sync(optimizer) -> int:
    """Set every compressed module's refresh index from the optimizer's step count (after load_state_dict).

    memwrap's own optimizer does this in its load_state_dict. With any other optimizer, call
    `memwrap.sync(optimizer)` right after `optimizer.load_state_dict(...)` so the first forward of the resumed
    run uses the same P as the uninterrupted run would. Returns the number of modules synced.
    """
    by_id = layers_by_coords()
    count = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            module = by_id.get(id(p))
            step = None if module is None else completed_steps(optimizer, p)
            if step is None:
                continue
            module.refresh_index = step // module.refresh_every
            module.group.refresh_index = module.refresh_index
            count += 1
    return count


_warned_unsynced = False


@torch.no_grad()
def _before_step(optimizer, args, kwargs) -> None:
    """Safety net for a resumed run without `sync`: the gradient was computed under the module's current P, so
    carry the first moment (stored under the P its step count implies) into that basis and warn once."""
    global _warned_unsynced
    if getattr(optimizer, "memwrap_owns_merge", False) or not len(_LAYERS):
        return
    by_id = None
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or "memwrap_step" not in state:
                continue
            by_id = by_id if by_id is not None else layers_by_coords()
            module = by_id.get(id(p))
            if module is None:
                continue
            expected = int(state["memwrap_step"]) // module.refresh_every
            if expected == module.refresh_index:
                continue
            t = module.group.transfer(expected, module.refresh_index)
            for key in MOMENTUM_KEYS:
                value = state.get(key)
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    carry(value, t)
            if not _warned_unsynced:
                _warned_unsynced = True
                warnings.warn("memwrap: this optimizer's state was loaded without memwrap.sync(optimizer); the resumed "
                              "run stays correct but is not bit-identical to an uninterrupted one. Call "
                              "memwrap.sync(optimizer) after optimizer.load_state_dict(...).", stacklevel=3)


@torch.no_grad()
def _after_step(optimizer, args, kwargs) -> None:
    if getattr(optimizer, "memwrap_owns_merge", False) or not len(_LAYERS):
        return
    by_id = layers_by_coords()
    for group in optimizer.param_groups:
        lr = float(group.get("lr", 0.0))
        decay = 1.0 - lr * float(group.get("weight_decay", 0.0) or 0.0)
        for p in group["params"]:
            module = by_id.get(id(p))
            if module is None:
                continue
            state = optimizer.state[p]
            step = int(state.get("memwrap_step", 0)) + 1
            state["memwrap_step"] = step
            module.merge(p.detach(), decay, step)
            local(p).zero_()
            t = module.advance(step)
            if t is not None:
                for key in MOMENTUM_KEYS:
                    value = state.get(key)
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        carry(value, t)
