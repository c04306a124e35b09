"""DeepSpeed ZeRO 1, 2 and 3: every update of a wrapped layer reaches its frozen weight, exactly once, on each rank.

DeepSpeed steps flat fp32 copies of the trainable parameters (its "master" partitions) and writes them back into the
parameters behind autograd, so memwrap's optimizer hook never sees a step. memwrap therefore attaches to the engine
itself, at the first forward the engine runs (`memwrap.deepspeed_attach(engine)` does the same by hand), and runs the
merge right after each step the engine's optimizer applies (never after one it skipped for inf/NaN):

  ZeRO 1/2   the coords of every wrapped layer are whole on every rank after the step (DeepSpeed all-gathers them), so
             each rank merges W ← W·(1 − lr·wd) + lift(coords) into its replica of W, then zeroes the coords and this
             rank's fragment of their fp32 master. No communication beyond DeepSpeed's own.
  ZeRO 3     W is partitioned like any frozen parameter: each rank keeps 1/world of it. The coords are gathered (one
             all-gather of the compressed size per layer) and each rank merges into its own shard of W; a persistent W
             (smaller than stage3_param_persistence_threshold, kept whole on every rank) is merged whole.

When the projection P is refreshed the optimizer's first moment is carried into the new subspace (gathered, multiplied
by the r × r transfer, scattered back). The step counters that decide refreshes follow the engine's count of applied
steps (global_steps − skipped_steps), so `engine.load_checkpoint` resumes on the same P.

Supported: ZeRO stages 1, 2 and 3 in fp32 or bf16 (bf16 stage 1 runs DeepSpeed's BF16_Optimizer), optimizer offload to
the CPU, and an engine without ZeRO in fp32 (a plain torch optimizer: memwrap's usual hook merges). Refused with an
UnsupportedEngineError before any step: fp16 or bf16 without ZeRO (FP16_Optimizer keeps master copies memwrap cannot
reach), NVMe offload of the optimizer, and memwrap's own optimizer as DeepSpeed's client optimizer.
"""

from __future__ import annotations

import functools
import sys
import weakref

import torch

from ..compress import base as _base
from ..compress import merge as _merge
from ..errors import UnsupportedEngineError

LINK_ATTR = "_memwrap_deepspeed"  # on the engine: the DeepSpeedLink
SUPPORTED = ("ZeRO stages 1, 2 and 3 in fp32 or bf16 (optimizer offload to the CPU included), "
             "and an engine without ZeRO in fp32")


def zero_stage_of(p: torch.Tensor) -> str | None:
    """'3' for a ZeRO-3 parameter, '1/2' for one linked to a ZeRO 1/2 (or BF16_Optimizer) fp32 master, else None."""
    if hasattr(p, "ds_id"):
        return "3"
    if hasattr(p, "_hp_mapping"):
        return "1/2"
    return None


def _is_engine(obj) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed")
               for c in type(obj).__mro__)


def find_engine(unit) -> object | None:
    """The DeepSpeed engine whose forward is running this unit's model: found on the call stack (the engine's
    forward calls its module), or None when the model was called directly."""
    frame = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if owner is not None and _is_engine(owner):
            module = getattr(owner, "module", None)
            if module is not None and any(u is unit for u in _merge.units_of(module)):
                return owner
        frame = frame.f_back
    return None


def check_unit(unit) -> bool:
    """At a wrapped layer's forwards (memwrap.compress.base runs every ENGINE_CHECKS entry until it says True): attach
    to the DeepSpeed engine running it, or refuse a ZeRO-managed layer that runs outside its engine. A layer trained
    outside DeepSpeed first is looked at again, cheaply, until DeepSpeed takes its coords over."""
    if "deepspeed" not in sys.modules:
        return False
    stage = zero_stage_of(unit.coords)
    if stage is None and unit.__dict__.get("_ds_looked"):
        return False  # the call stack was searched once already: again only when DeepSpeed manages the coords
    unit.__dict__["_ds_looked"] = True
    engine = find_engine(unit)
    if engine is not None:
        attach(engine)
        return True
    if stage is not None:
        raise UnsupportedEngineError(
            f"wrapped layer {unit.layer_name!r} is managed by DeepSpeed ZeRO (stage {stage}) but runs outside the "
            "engine's forward, so memwrap cannot find the engine whose steps it must merge. Call the engine "
            "(`loss = engine(batch)`), or attach it once by hand: memwrap.deepspeed_attach(engine).")
    return False


def attach(engine) -> DeepSpeedLink | None:
    """Make a DeepSpeed engine merge every step into the wrapped layers of `engine.module` (idempotent).

    Called by memwrap at the first forward the engine runs; call it yourself when you run `engine.module` directly.
    Raises UnsupportedEngineError (nothing stepped, the model untouched) for what cannot be made exact."""
    link = engine.__dict__.get(LINK_ATTR)
    if link is not None and link.alive():
        return link
    every = _merge.units_of(engine.module)
    units = [u for u in every if u.coords.requires_grad]  # a layer the user froze is not stepped: nothing to merge
    optimizer = getattr(engine, "optimizer", None)
    kind = _kind(optimizer)
    if kind == "torch" or not units:  # no ZeRO, fp32: a torch optimizer steps the parameters, memwrap's hook merges
        for u in every:
            u._engine_checked = True
        return None
    eight_bit = [u.layer_name for u in every if u.quant is not None]
    if eight_bit:
        raise UnsupportedEngineError(
            f"this model's wrapped weights are stored in 8 bits ({eight_bit[0]!r} and {len(eight_bit) - 1} more: "
            "wrap(weights='int8'/'fp8')), which DeepSpeed's flat parameter copies cannot hold. Nothing has been "
            "stepped. Wrap with weights='keep' to train under DeepSpeed, or train the 8-bit model with DDP or FSDP2.")
    if kind is None:
        raise UnsupportedEngineError(
            f"DeepSpeed runs this model with {type(optimizer).__name__}, which keeps master copies of the parameters "
            "that memwrap cannot reach, so the updates of the wrapped layers would never reach their weights. Nothing "
            f"has been stepped. memwrap supports {SUPPORTED}: enable zero_optimization (stage 1, 2 or 3) for bf16 or "
            "fp16 training.")
    if getattr(optimizer, "swap_optimizer", False):
        raise UnsupportedEngineError(
            "DeepSpeed swaps this model's optimizer states to NVMe; memwrap merges each step's update from the fp32 "
            f"master in memory and does not support NVMe offload. Nothing has been stepped. memwrap supports {SUPPORTED}: "
            "offload the optimizer to the cpu instead (offload_optimizer.device = 'cpu').")
    basic = getattr(optimizer, "optimizer", None)
    if getattr(basic, "memwrap_owns_merge", False):
        raise UnsupportedEngineError(
            "memwrap's own optimizer was given to DeepSpeed: it writes the dense weights itself, which DeepSpeed's "
            "flat master copies bypass. Nothing has been stepped. Give DeepSpeed a torch optimizer over "
            "model.parameters() (or its \"optimizer\" config section, e.g. AdamW); memwrap merges its updates.")
    if kind == "zero3":
        unmanaged = [u.layer_name for u in units if not hasattr(u.coords, "ds_id")]
    else:
        unmanaged = [u.layer_name for u in units if not hasattr(u.coords, "_hp_mapping")]
    if unmanaged:
        raise UnsupportedEngineError(
            f"the coords of {unmanaged[:3]} are not among the parameters DeepSpeed optimizes, so those layers would "
            "not train. Nothing has been stepped. Pass every trainable parameter to deepspeed.initialize "
            "(model_parameters=[p for p in model.parameters() if p.requires_grad]).")
    link = DeepSpeedLink(engine, optimizer, units, kind)
    engine.__dict__[LINK_ATTR] = link
    for u in every:  # checked (the frozen ones too): no forward of this model looks for its engine again
        u._engine_checked = True
    return link


def _kind(optimizer) -> str | None:
    """'zero12' (DeepSpeedZeroOptimizer, BF16_Optimizer), 'zero3', 'torch' (a plain torch optimizer), None (other)."""
    names = {c.__name__ for c in type(optimizer).__mro__ if c.__module__.startswith("deepspeed")}
    if "DeepSpeedZeroOptimizer_Stage3" in names:
        return "zero3"
    if names & {"DeepSpeedZeroOptimizer", "BF16_Optimizer"}:
        return "zero12"
    if isinstance(optimizer, torch.optim.Optimizer):
        return "torch"
    return None


class DeepSpeedLink:
    """What memwrap attached to one engine: its optimizer's `step` (an attribute of that instance, removed by
    `detach`), the wrapped units, and where each unit's coords sit in the engine's parameter groups."""

    def __init__(self, engine, optimizer, units: list, kind: str):
        self.engine_ref = weakref.ref(engine)
        self.optimizer = optimizer
        self.units = list(units)
        self.kind = kind
        self.group_of = self._groups()
        self.moment_keys = self._moment_keys()
        self.step_fn = optimizer.step
        optimizer.step = functools.partial(_step, weakref.ref(self), optimizer.step)
        self.offset: dict[int, int] = {}  # id(unit) -> the unit's steps before this engine's first
        self.sync_steps(attaching=True)
        for u in self.units:
            u._engine_checked = True
            u._ds_link = self

    def __deepcopy__(self, memo):  # a copied (or pickled) model is not attached to this engine: its copy holds None
        return None

    def __reduce__(self):
        return type(None), ()

    def alive(self) -> bool:
        return self.engine_ref() is not None and all(u in _merge._UNITS for u in self.units)

    def detach(self) -> None:
        """Give the engine's optimizer its own step back (memwrap.unwrap calls this)."""
        if self.optimizer.__dict__.get("step") is not None:
            del self.optimizer.__dict__["step"]
        engine = self.engine_ref()
        if engine is not None and engine.__dict__.get(LINK_ATTR) is self:
            del engine.__dict__[LINK_ATTR]
        for u in self.units:
            u.__dict__.pop("_ds_link", None)

    def _groups(self) -> dict[int, int]:
        """id(coords) -> index of the basic optimizer's param group that steps their fp32 master."""
        opt = self.optimizer
        if self.kind == "zero3":
            groups = [(opt.sub_group_to_group_id[i], g) for i, g in enumerate(opt.fp16_groups)]
        else:
            groups = list(enumerate(getattr(opt, "bit16_groups", None) or opt.bf16_groups))
        out = {id(p): gi for gi, params in groups for p in params}
        return {id(u.coords): out.get(id(u.coords), 0) for u in self.units}

    def _moment_keys(self) -> tuple[str, ...]:
        entry = _merge.first_moment_of(self.optimizer.optimizer)
        if entry is not None and entry.carry is None:
            return tuple(entry.keys)
        return ("exp_avg",)  # DeepSpeed's Adam and Lion kernels, torch Adam(W)

    def applied_steps(self) -> int:
        engine = self.engine_ref()
        return int(engine.global_steps) - int(getattr(engine, "skipped_steps", 0))

    def sync_steps(self, attaching: bool = False) -> None:
        """Counters and P from the engine's count of applied steps: at attach, a resumed engine's count (a fresh
        engine keeps the steps a layer took before DeepSpeed, as an offset); later, a checkpoint the engine loaded."""
        applied = self.applied_steps()
        for u in self.units:
            if attaching:
                self.offset[id(u)] = 0 if applied else u.steps
            want = applied + self.offset[id(u)]
            if u.steps != want:
                u.set_steps(want)

    def decay(self, unit) -> float:
        group = self.optimizer.optimizer.param_groups[self.group_of[id(unit.coords)]]
        return _merge._decay(self.optimizer.optimizer, group)

    @torch.no_grad()
    def after_step(self) -> None:
        """Merge what the step just applied to every wrapped layer's coords; zero them and their fp32 master."""
        self.sync_steps()  # a checkpoint loaded since the last step
        for unit in self.units:
            decay = self.decay(unit)
            step = unit.steps + 1
            if self.kind == "zero3":
                self._merge_zero3(unit, decay, step)
            else:
                self._merge_zero12(unit, decay, step)
            unit.steps = step
            unit._base = None
            unit._merged = (id(unit.coords), unit.coords._version)
            t = unit.advance(step)
            if t is not None:
                self._carry(unit, t)

    def _merge_zero12(self, unit, decay: float, step: int) -> None:
        p = unit.coords  # whole on every rank: DeepSpeed all-gathered the updated bit16 partitions
        unit.merge(p.detach(), decay, step)
        p.detach().zero_()
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            mapping.hp_fragment.zero_()

    def _merge_zero3(self, unit, decay: float, step: int) -> None:
        opt, p, w = self.optimizer, unit.coords, unit.weight
        full = opt.get_full_hp_param(p)  # all-gather of the fp32 master: the exact update, whole, on every rank
        if w.numel() == w.ds_numel:  # W whole here (persistent, or gathered): merge it whole, then refresh the shard
            unit.merge(full, decay, step)
            _copy_shard(w, w.detach())
        else:
            merge_shard(unit, full, decay, step)
        opt.set_local_hp_param(torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=p.ds_tensor.device), p)
        p.ds_tensor.zero_()
        if p.numel() == p.ds_numel:
            p.detach().zero_()

    def _carry(self, unit, t: torch.Tensor) -> None:
        """First moment into the new subspace: gathered whole, times T (r × r), written back to each rank's part."""
        p = unit.coords
        for key in self.moment_keys:
            if self.kind == "zero3":
                m = self.optimizer.get_full_hp_param(p, key)
                self.optimizer.set_full_hp_param((m.float() @ t.to(m.device)).to(m.dtype), p, key)
            else:
                m = p.get_full_hp_param(key)
                p.set_full_hp_param((m.float() @ t.to(m.device)).to(m.dtype), key)


def _step(link_ref, step_fn, *args, **kwargs):
    """The engine optimizer's step: DeepSpeed's own, then memwrap's merge unless DeepSpeed skipped it (inf/NaN)."""
    out = step_fn(*args, **kwargs)
    link = link_ref()
    if link is not None and not getattr(link.optimizer, "overflow", False):
        link.after_step()
    return out


def _shard_range(w) -> tuple[int, int]:
    """[start, stop) of W's flattened elements that this rank's ZeRO-3 shard (ds_tensor) holds."""
    import torch.distributed as dist

    size = w.ds_tensor.numel()
    rank = dist.get_rank(group=w.ds_process_group)
    start = min(w.ds_numel, rank * size)
    return start, min(w.ds_numel, start + size)


def _copy_shard(w, whole: torch.Tensor) -> None:
    start, stop = _shard_range(w)
    w.ds_tensor.view(-1)[: stop - start].copy_(whole.reshape(-1)[start:stop])


def merge_shard(unit, full: torch.Tensor, decay: float, step: int) -> None:
    """W's shard ← shard·decay + the same elements of lift(full): only the rows (or experts) the shard touches are
    lifted, so the transient is about the shard's size."""
    w = unit.weight
    start, stop = _shard_range(w)
    if stop <= start:
        return
    shard = w.ds_tensor.view(-1)[: stop - start]
    shape = tuple(w.ds_shape)
    if unit.transposed:  # storage (…, m, n): lift whole experts (one matrix each) that overlap the shard
        per = shape[-1] * shape[-2]
        lo, hi = start // per, -(-stop // per)
        lead = full.reshape(-1, *full.shape[-3:])[lo:hi]
        delta = unit.lifted(lead).transpose(-1, -2).reshape(-1)
        offset = lo * per
    else:  # storage (…, n, m): lift the rows that overlap the shard
        m = shape[-1]
        lo, hi = start // m, -(-stop // m)
        rows = full.reshape(-1, *full.shape[-2:])[lo:hi]
        delta = unit.lifted(rows).reshape(-1)
        offset = lo * m
    _base.add_to_weight(shard, delta[start - offset: stop - offset], decay, stochastic=unit.stochastic_rounding,
                        seed=unit.group.seed, name=f"{unit.layer_name}#shard{start}", step=step)


def engine_bytes(engine) -> dict[str, int]:
    """This rank's bytes as a ZeRO engine holds them — what the planner's `zero_bytes` predicts: "params", the module's
    parameters (their local shards under ZeRO-3), and "states", the optimizer's fp32 master partitions and moments
    (scalar step counts left out)."""
    params = 0
    for p in engine.module.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p
        params += local.numel() * local.element_size()
    opt = engine.optimizer
    masters = next(getattr(opt, name) for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                                                   "fp32_groups_flat_partition") if hasattr(opt, name))
    states = sum(t.numel() * t.element_size() for t in masters)
    states += sum(v.numel() * v.element_size() for st in opt.optimizer.state.values() for v in st.values()
                  if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "states": states}
