"""The update path: every update that reaches `coords` reaches the dense weight W exactly once.

Three ways an update arrives, one rule for each:

* **a torch.optim optimizer step** (AdamW, Adafactor, SGD, bitsandbytes, ...): after the step, for every coords
  the step used (grad not None, the step not skipped by GradScaler), W ← W·(1 − lr·wd) + lift(coords),
  coords ← 0, the layer's step counter moves, and every `refresh_every` steps a new P is drawn with the
  optimizer's first moment carried into the new subspace (`FIRST_MOMENTS`). ZeroRedundancyOptimizer merges
  after it has broadcast every shard, on every rank.
* **anything else that writes coords in place** (a manual `p.add_(p.grad, alpha=-lr)` loop, a flat master copy
  copied back with `p.copy_`): the write moves the tensor's version counter; the next forward of the layer
  sees it and merges then (no decay: nothing says what it would be). A host-side integer compare, no device sync.
* **writes autograd cannot see** (`p.data.add_(...)`): no version moves. The forward checks the coords' values
  now and then (forward 2, 16, then every 256) and raises `UnmergedUpdateError`, which names the fix.

How memwrap finds the optimizers. torch has no hook for the construction of an optimizer, and one that holds
coords can be built at any time after `wrap`, so one process-global step pre-hook stays installed while any
wrapped layer is alive (it is removed when the last one is unwrapped or garbage-collected). At an optimizer's
first step it checks what the optimizer holds: an optimizer built before `wrap` (dense weights of wrapped layers,
not their coords) raises `OptimizerBeforeWrapError`; one that holds coords gets its own step post-hook and
load_state_dict post-hook, which die with it; for any other optimizer the global hook is one dictionary lookup.

The step counter that drives refreshes lives on each compressed weight (`unit.steps`), never in the optimizer's
state; `memwrap.save` writes it and `memwrap.load` restores it, and `sync(optimizer)` sets it from the optimizer's
own step count after `optimizer.load_state_dict` (for checkpoints written by other tools).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import NonFiniteError, OptimizerBeforeWrapError
from . import grouped
from .base import CompressedWeight, local, materialize, max_abs_flag, raise_unmerged, take_unmerged_checks

_UNITS: weakref.WeakSet = weakref.WeakSet()  # every live compressed weight (linear or experts)
_GLOBAL_HOOK = None  # the discovery pre-hook's handle while any compressed weight is alive
_LINKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> _Link (what memwrap knows of it)
_WARNED: set[str] = set()  # one-time warnings already given


# ---- non-finite steps ---------------------------------------------------------------------------------------------
def _policy(units) -> str:
    policies = {getattr(u, "nonfinite", "skip") for u in units}
    return next((p for p in ("raise", "skip") if p in policies), "ignore")


def _all_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """One bool tensor: every element of every gradient finite. A fused max-abs per (device, dtype) group, reduced to
    one flag on the first gradient's device (all-reduced when the gradients are shards of DTensors)."""
    first = grads[0]
    ok = max_abs_flag([local(g) for g in grads], lambda norms: norms.float().isfinite())
    if getattr(first, "placements", None) is not None:  # FSDP2: each rank holds other rows; all must agree
        import torch.distributed as dist

        bad = (~ok).to(torch.int32)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        ok = bad == 0
    return ok


def nonfinite_check(optimizer, held: list[tuple[torch.Tensor, CompressedWeight]]) -> bool:
    """Before an optimizer step over coords: True when the step goes ahead, False when it must be skipped.

    held: (coords, its layer) for every coords with a gradient. The layers' policy (memwrap.wrap(nonfinite=...)):
    "skip" (a step with a non-finite coords gradient is skipped whole, counted, and warned about), "raise"
    (NonFiniteError naming the first such layer, before anything changed), "ignore". One host sync per step, which
    also reads the flag of the forward's check for coords written behind autograd's back (UnmergedUpdateError)."""
    if not held:
        return True
    units = [u for _, u in held]
    unmerged = take_unmerged_checks(units)  # the coords-value checks of this step's forward (2, 16, every 256)
    policy = _policy(units)
    if policy == "ignore":
        if unmerged is not None and not bool(unmerged):
            raise_unmerged(units)
        return True
    ok = _all_finite([p.grad for p, _ in held])
    if unmerged is not None:
        ok = torch.stack([ok, unmerged.to(ok.device)]).all()
    if bool(ok):  # the one host read of a step
        return True
    if unmerged is not None and not bool(unmerged):
        raise_unmerged(units)
    bad = next((u.layer_name for p, u in held if not bool(local(p.grad).isfinite().all())), "?")
    if policy == "raise":
        raise NonFiniteError(
            f"the gradient of wrapped layer {bad!r} is not finite (inf or NaN) at this {type(optimizer).__name__} step; "
            "nothing was updated. Lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), use bf16 "
            "instead of fp16 or a GradScaler, or wrap with nonfinite='skip' to skip such steps.", layer=bad)
    for _, unit in held:
        unit.skipped_steps = getattr(unit, "skipped_steps", 0) + 1
    count = max(getattr(u, "skipped_steps", 0) for _, u in held)
    if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th ... skip: a count, not a flood
        warnings.warn(f"memwrap: skipped an optimizer step whose gradients are not finite (inf or NaN; first in "
                      f"{bad!r}); {count} step(s) skipped so far. The weights and the optimizer state are as before "
                      "the step. Lower the learning rate or clip gradients if this repeats; wrap(nonfinite='raise') "
                      "stops instead.", RuntimeWarning, stacklevel=4)
    return False


def _skip_torch_step(optimizer, kwargs) -> None:
    """The discovery pre-hook's check for a torch optimizer holding coords: on a skipped step every gradient of the
    optimizer is set to None, so the optimizer itself steps nothing (its state and step counts stay as they were)
    and the post-hook merges nothing."""
    if _step_skipped(optimizer, kwargs):  # GradScaler's own skip (fused optimizers): its decision stands
        return
    by_coords = layers_by_coords()
    held = [(p, by_coords[id(p)]) for g in optimizer.param_groups for p in g["params"]
            if id(p) in by_coords and p.grad is not None]
    if not nonfinite_check(optimizer, held):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None


# ---- first moments: which optimizer state is carried into a refreshed subspace ----------------------------------
@dataclass(frozen=True)
class FirstMoment:
    """Where an optimizer kind keeps the first moment of a parameter (state entries shaped like the parameter).

    `names` are class names matched against the optimizer's MRO, `module` a prefix of that class's module.
    `keys` empty means the kind has no first moment (nothing to carry, nothing to warn about). `carry` handles
    states that are not plain float tensors (8-bit): carry(state, keys, T) updates them in place.
    """

    names: tuple[str, ...]
    keys: tuple[str, ...]
    module: str = ""
    carry: Callable | None = None


def _carry_blockwise_8bit(state: dict, keys: tuple[str, ...], t: torch.Tensor) -> None:
    """bitsandbytes 8-bit states: dequantize (blockwise, dynamic map), carry, quantize back."""
    import bitsandbytes.functional as bnbf

    for key in keys:
        q = state.get(key)
        if not isinstance(q, torch.Tensor):
            continue
        if q.dtype != torch.uint8:  # 32-bit bitsandbytes optimizers keep float states
            carry(q, t)
            continue
        suffix = key[-1]
        absmax, code = state[f"absmax{suffix}"], state[f"qmap{suffix}"]
        full = bnbf.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=256)
        moved = full.float() @ t.to(full.device)
        new_q, quant_state = bnbf.quantize_blockwise(moved.to(full.dtype), code=code, blocksize=256)
        q.copy_(new_q)
        absmax.copy_(quant_state.absmax)


FIRST_MOMENTS: list[FirstMoment] = [
    FirstMoment(("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "SparseAdam"), ("exp_avg",), module="torch."),
    FirstMoment(("SGD",), ("momentum_buffer",), module="torch."),
    FirstMoment(("RMSprop",), ("momentum_buffer", "grad_avg"), module="torch."),
    FirstMoment(("Adagrad", "Adadelta", "Adafactor"), (), module="torch."),  # second moments only
    FirstMoment(("Adafactor",), ("exp_avg",), module="transformers"),  # present when beta1 is set
    FirstMoment(("Lion",), ("exp_avg",)),  # lion-pytorch, timm, ...
    FirstMoment(("FusedAdam", "DeepSpeedCPUAdam", "FusedLion", "DeepSpeedCPULion", "FusedLamb"), ("exp_avg",),
                module="deepspeed"),  # DeepSpeed's kernels, as DeepSpeed's basic optimizer
    FirstMoment(("Optimizer8bit", "Optimizer2State", "Optimizer1State"), ("state1",), module="bitsandbytes",
                carry=_carry_blockwise_8bit),
]


def register_first_moment(names, keys, module: str = "", carry: Callable | None = None) -> None:
    """Teach memwrap where an optimizer keeps its first moment (checked before the built-in entries)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    FIRST_MOMENTS.insert(0, FirstMoment(names, keys, module, carry))


def first_moment_of(optimizer) -> FirstMoment | None:
    """The table entry for this optimizer's class (or a base class of it), None when memwrap does not know it."""
    for cls in type(optimizer).__mro__:
        for entry in FIRST_MOMENTS:
            if cls.__name__ in entry.names and cls.__module__.startswith(entry.module):
                return entry
    return None


def carry(state_tensor: torch.Tensor, t: torch.Tensor) -> None:
    """In place: subspace coordinates (…, r) under the old P -> the nearest ones under the new P."""
    loc = local(state_tensor)
    loc.copy_((loc.float() @ t.to(loc.device)).to(loc.dtype))


def carry_many(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """`carry` for many (state tensor, T) pairs at once: those of one shape, dtype and device in one batched matmul."""
    groups: dict[tuple, list] = {}
    for state_tensor, t in pairs:
        loc = local(state_tensor)
        groups.setdefault((tuple(loc.shape), loc.dtype, loc.device), []).append((loc, t))
    for (shape, _, device), items in groups.items():
        if len(items) == 1:
            carry(*items[0])
            continue
        locs = [loc for loc, _ in items]
        x = torch.stack(locs).float()  # one kernel each on a GPU (a stack into another dtype copies one by one)
        ts = torch.stack([t for _, t in items]).to(device)
        moved = torch.bmm(x.view(len(locs), -1, shape[-1]), ts)
        torch._foreach_copy_(locs, list(moved.view(len(locs), *shape).unbind(0)))


def carry_first_moment(optimizer, p: torch.Tensor, t: torch.Tensor) -> None:
    """Carry the optimizer's first moment of coords `p` into the new subspace (T: r × r), or warn once."""
    state = optimizer.state.get(p)
    if not state:
        return
    entry = first_moment_of(optimizer)
    if entry is None:
        shaped = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape]
        if shaped:
            _warn_once(f"moment:{type(optimizer).__qualname__}",
                       f"memwrap: {type(optimizer).__name__} keeps state {shaped} shaped like the compressed coords, "
                       "and memwrap does not know which of it is a first moment, so it is not carried into the new "
                       "subspace when P is refreshed and goes stale. Teach memwrap with memwrap.register_first_moment("
                       f"{type(optimizer).__name__!r}, [keys]) (or [] if it has none).")
        return
    if entry.carry is not None:
        entry.carry(state, entry.keys, t)
        return
    for key in entry.keys:
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == p.shape:
            carry(value, t)


# ---- the registry of live compressed weights ----------------------------------------------------------------
def register(unit: CompressedWeight) -> None:
    """Track a compressed weight; the first one installs the discovery hook."""
    global _GLOBAL_HOOK
    if unit in _UNITS:
        return
    _UNITS.add(unit)
    weakref.finalize(unit, _maybe_uninstall)
    if _GLOBAL_HOOK is None:
        _GLOBAL_HOOK = register_optimizer_step_pre_hook(_discover)


def unregister(unit: CompressedWeight) -> None:
    _UNITS.discard(unit)
    engine_link = unit.__dict__.get("_ds_link")  # memwrap.integrations.deepspeed: the engine's step goes back
    if engine_link is not None:
        engine_link.detach()
    _maybe_uninstall()


def _maybe_uninstall() -> None:
    """No compressed weight alive: remove the global hook and every hook memwrap attached to an optimizer."""
    global _GLOBAL_HOOK
    if any(True for _ in _UNITS):  # iterating skips references that died in this very collection
        return
    if _GLOBAL_HOOK is not None:
        _GLOBAL_HOOK.remove()
        _GLOBAL_HOOK = None
    for link in list(_LINKS.values()):
        link.remove_hooks()
    _LINKS.clear()


def hook_installed() -> bool:
    """Whether any memwrap code runs in optimizer steps (the global discovery hook or an optimizer's own hook)."""
    return _GLOBAL_HOOK is not None or any(link.handles for link in _LINKS.values())


def units_of(model) -> list[CompressedWeight]:
    """Every compressed unit of a model: CompressedLinear modules and fused-experts units, in module order."""
    out = []
    for m in model.modules():
        if isinstance(m, CompressedWeight):
            out.append(m)
        out.extend(getattr(m, "_memwrap_experts", {}).values())  # memwrap.compress.experts.UNITS_ATTR
    return out


def layers_by_coords() -> dict[int, CompressedWeight]:
    """id(coords parameter) -> unit, rebuilt on each call (FSDP2 replaces parameters with DTensors)."""
    return {id(u.coords): u for u in list(_UNITS)}


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=4)


# ---- optimizers ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Link:
    """What memwrap knows of one optimizer; the handles of the hooks it attached to it."""

    n_params: int
    holds_coords: bool
    owns_merge: bool = False  # memwrap's own optimizer writes W itself
    deferred: bool = False  # the local optimizer inside a ZeroRedundancyOptimizer: the outer one merges
    check_resume: bool = True  # compare step counts once, at the next step (first step, or after load_state_dict)
    moments: object = None  # the optimizer whose state holds the moments (ZeroRedundancyOptimizer: its local one)
    handles: list = field(default_factory=list)

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _n_params(optimizer) -> int:
    return sum(len(g["params"]) for g in optimizer.param_groups)


def _is_zero_redundancy(optimizer) -> bool:
    return any(c.__name__ == "ZeroRedundancyOptimizer" and c.__module__.startswith("torch.distributed")
               for c in type(optimizer).__mro__)


def _discover(optimizer, args, kwargs) -> None:
    """Global pre-hook: link an optimizer at its first step (again when its parameter list changed)."""
    link = _LINKS.get(optimizer)
    if link is None or link.n_params != _n_params(optimizer):
        if link is not None:
            link.remove_hooks()
        link = _link(optimizer)
    if link.holds_coords and not link.owns_merge:
        if link.check_resume:
            _check_resume(optimizer, link)
        if not link.deferred:
            _skip_torch_step(optimizer, kwargs)


def check_heads(params) -> None:
    """Before the first step of an optimizer holding coords: a compressed output head whose coords got no gradient
    while other layers' did was bypassed (a fused loss that reads lm_head.weight itself): warn, it would not train."""
    by_coords = layers_by_coords()
    held = [(p, by_coords[id(p)]) for p in params if id(p) in by_coords]
    if not any(p.grad is not None for p, _ in held):
        return
    for p, unit in held:
        if getattr(unit, "is_head", False) and p.requires_grad and p.grad is None:
            _warn_once(f"head:{unit.layer_name}",
                       f"memwrap: the compressed output head {unit.layer_name!r} got no gradient in this step while the "
                       "other wrapped layers did: something computed the loss from its weight directly (a fused "
                       "linear cross-entropy kernel?), bypassing the layer, so the head does not train. Wrap with "
                       "head='exact', or let the model compute its loss (memwrap's chunked loss keeps the logits small).")


def _link(optimizer) -> _Link:
    by_coords = layers_by_coords()
    by_weight = {id(u.weight): u for u in list(_UNITS)}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    orphans = [u for wid, u in by_weight.items() if wid in held and id(u.coords) not in held]
    if orphans:
        names = ", ".join(repr(u.layer_name) for u in orphans[:3]) + (" ..." if len(orphans) > 3 else "")
        raise OptimizerBeforeWrapError(
            f"{type(optimizer).__name__} holds the dense weights of {len(orphans)} layer(s) memwrap wrapped ({names}) but "
            "not their `coords`: it was built before memwrap.wrap, and those weights are frozen now, so it would train "
            "nothing. Build the optimizer after memwrap.wrap(model), e.g. torch.optim.AdamW(model.parameters(), ...) "
            "or memwrap.optimizer(model, ...).")
    link = _Link(n_params=len(held), holds_coords=any(pid in by_coords for pid in held),
                 owns_merge=bool(getattr(optimizer, "memwrap_owns_merge", False)))
    if link.holds_coords:
        check_heads([p for g in optimizer.param_groups for p in g["params"]])
    _LINKS[optimizer] = link
    if link.holds_coords and not link.owns_merge:
        for pid, p in ((id(p), p) for g in optimizer.param_groups for p in g["params"]):
            if pid in by_coords:  # it writes its update into coords: they need a storage (memwrap.optimizer drops it)
                materialize(p)
        link.handles.append(optimizer.register_step_post_hook(_after_step))
        link.handles.append(optimizer.register_load_state_dict_post_hook(_after_load))
        if any(g.get("scale_parameter") and g.get("relative_step") is not None for g in optimizer.param_groups):
            _warn_once(f"scale:{type(optimizer).__qualname__}",
                       f"memwrap: {type(optimizer).__name__}(scale_parameter=True) scales each step by the parameter's "
                       "RMS; a wrapped layer's coords are zero between steps, so its steps are scaled by eps (1e-3) "
                       "instead of the weight's RMS and it barely trains. Use scale_parameter=False, or "
                       "memwrap.optimizer(model).")
    if _is_zero_redundancy(optimizer):
        inner = getattr(optimizer, "optim", None)
        if inner is not None:  # its local optimizer steps this rank's shard; the merge waits for the broadcast
            inner_link = _link(inner) if inner not in _LINKS else _LINKS[inner]
            inner_link.deferred = True
            link.moments = weakref.ref(inner)
    return link


def _after_load(optimizer) -> None:
    link = _LINKS.get(optimizer)
    if link is not None:
        link.check_resume = True


def optimizer_steps(optimizer, p) -> int | None:
    """Steps the optimizer has applied to coords `p`, from its own state (None when it keeps no count)."""
    state = optimizer.state.get(p)
    if not state:
        return None
    step = state.get("memwrap_step", state.get("step"))  # memwrap_step: written by memwrap 0.1.0
    if step is None:
        return None
    try:
        return int(step)
    except (TypeError, ValueError, RuntimeError):
        return None


@torch.no_grad()
def _check_resume(optimizer, link: _Link) -> None:
    """Once after a load: a resumed run without `sync`. The gradient of this step was computed under each layer's
    current P; the loaded first moment lives under the P its step count implies. Carry it over, adopt the count."""
    link.check_resume = False
    if link.deferred:
        return
    by_coords = layers_by_coords()
    stale = False
    for group in optimizer.param_groups:
        for p in group["params"]:
            unit = by_coords.get(id(p))
            steps = None if unit is None else optimizer_steps(optimizer, p)
            if steps is None or steps == unit.steps:
                continue
            optimizer.state[p].pop("memwrap_step", None)
            expected = unit.index_at(steps)
            if expected != unit.refresh_index:
                carry_first_moment(optimizer, p, unit.group.transfer(expected, unit.refresh_index))
            unit.steps = steps
            stale = True
    if stale:
        _warn_once("unsynced", "memwrap: this optimizer's state was loaded without memwrap.sync(optimizer); the resumed "
                               "run stays correct but is not bit-identical to an uninterrupted one. Call "
                               "memwrap.sync(optimizer) after optimizer.load_state_dict(...).")


def sync(optimizer) -> int:
    """Set every compressed weight's step counter and P from the optimizer's step count (after load_state_dict).

    memwrap.load restores the counters itself and memwrap's own optimizer syncs in its load_state_dict. After
    `optimizer.load_state_dict(...)` of a checkpoint another tool wrote (Trainer, accelerate, DCP), call
    `memwrap.sync(optimizer)` so the resumed run uses the same P as the uninterrupted run would. Optimizers that
    keep no step count (SGD) leave the counters as they are. Returns the number of weights synced.
    """
    by_coords = layers_by_coords()
    count = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            unit = by_coords.get(id(p))
            steps = None if unit is None else optimizer_steps(optimizer, p)
            if steps is None:
                continue
            optimizer.state[p].pop("memwrap_step", None)  # 0.1.0 kept the count there
            unit.set_steps(steps)
            count += 1
    link = _LINKS.get(optimizer)
    if link is not None:
        link.check_resume = False
    return count


def _step_skipped(optimizer, kwargs) -> bool:
    """GradScaler skipped this step for inf/NaN gradients, yet called step (optimizers with `fused=True`)."""
    found_inf = getattr(optimizer, "found_inf", None)
    if isinstance(found_inf, torch.Tensor):
        return bool(found_inf.item())
    scaler = (kwargs or {}).get("grad_scaler")
    if scaler is not None:
        return bool(sum(v.item() for v in scaler._found_inf_per_device(optimizer).values()))
    return False


def _decay(optimizer, group) -> float:
    """1 − lr·wd of a parameter group, as the optimizer's decoupled weight decay would apply it to W."""
    lr, wd = group.get("lr"), group.get("weight_decay", 0.0) or 0.0
    try:
        wd = float(wd)
        lr = float(lr)
    except (TypeError, ValueError):  # HF Adafactor with lr=None computes a relative step per parameter
        if wd:
            _warn_once(f"decay:{type(optimizer).__qualname__}",
                       f"memwrap: {type(optimizer).__name__} has no numeric lr (lr={lr!r}), so its weight_decay={wd} is "
                       "not applied to the dense weights of wrapped layers (only to their coords, which are zero). "
                       "Give it a numeric lr, or decay those weights yourself.")
        return 1.0
    return 1.0 - lr * wd if math.isfinite(lr) else 1.0


@torch.no_grad()
def _after_step(optimizer, args, kwargs) -> None:
    """Post-hook of an optimizer that holds coords: merge what this step put into them."""
    link = _LINKS.get(optimizer)
    if link is None or link.deferred or _step_skipped(optimizer, kwargs):
        return
    by_coords = layers_by_coords()
    moments = link.moments() if link.moments is not None else optimizer
    for group in optimizer.param_groups:
        pairs = []
        for p in group["params"]:
            unit = by_coords.get(id(p))
            if unit is None or p.grad is None:
                continue  # not a compressed weight, or skipped by the optimizer: no merge, no decay, no count
            if not unit.claim(optimizer, p.grad):
                continue  # the same gradient was merged by another optimizer (a wrapper and the one it wraps)
            pairs.append((p, unit))
        if pairs:
            for p, t in merge_steps(pairs, _decay(optimizer, group)):
                carry_first_moment(moments, p, t)


def merge_steps(pairs: list[tuple[torch.Tensor, CompressedWeight]], decay: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """After an optimizer step on coords: for every (coords p, its weight), W ← W·decay + lift(p), p ← 0, the step
    counted, P refreshed when due; grouped by shape (memwrap.compress.grouped), so the kernels do not grow with depth.

    Returns (p, T) for every weight whose P changed (the caller carries the optimizer's first moment with T)."""
    by_step: dict[int, list] = {}
    for p, unit in pairs:
        unit.steps += 1
        by_step.setdefault(unit.steps, []).append((p, unit))
    for step, items in by_step.items():
        grouped.merge_many([u for _, u in items], [u._pending(p) for p, u in items], decay, step)
    torch._foreach_zero_([local(p) for p, _ in pairs])
    moved = []
    for p, unit in pairs:
        unit._base = None
        unit._merged = (id(p), p._version)
        t = unit.advance(unit.steps)
        if t is not None:
            moved.append((p, t))
    return moved
