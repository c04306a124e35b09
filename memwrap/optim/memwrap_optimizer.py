"""ProjFactor / subspace AdamW for compressed layers, AdamW for every other trainable parameter.

The class does the bookkeeping; the `_projfactor_update`, `_subspace_adamw_update` and `_adamw_step`
functions do the math. State holds only tensors (`torch.load(..., weights_only=True)` restores it).

Wrapped layers (G_s = coords.grad, shape (…, n, c, r); Ĝ = lift(G_s), shape (…, n, m)); first moments in the
coords' dtype (bf16 for a bf16 model), second moments in fp32:
  ProjFactor      exp_avg (…, n, c, r) in the subspace; second moment of Ĝ² as rank-1 row (…, n) and
                  column (…, m) factors (Adafactor-style); update lift(m̂) / sqrt(v̂) written straight into W.
  subspace AdamW  exp_avg and exp_avg_sq (…, n, c, r) in the subspace; update lift(m̂ / sqrt(v̂)).
On a refresh of P the first moment is carried into the new subspace (m ← m · Q_oldᵀ Q_new); second
moments are kept.

error_feedback=True adds, per wrapped weight, `residual` (…, n, m) in float32 — 4 bytes per weight
element, as much as an fp32 gradient of that weight. It accumulates exactly what a refresh of P drops from
the first moment: at a refresh, total = lift_old(m) + residual, m ← the least-squares coordinates of total
under the new P, residual ← total − lift_new(m). Nothing else is dropped between refreshes (the moment lives
in the subspace), so this is the whole approximation error of the optimizer state, re-injected as soon as a
later subspace can represent it. The gradient's own projection error cannot be accumulated: it would need
the full input x, which memwrap never stores.

FSDP2 (coords a DTensor sharded on dim 0): state tensors are DTensors sharded like coords (v_col replicated when
the rows n are sharded), so torch.distributed.checkpoint saves every shard; the math runs on the local shards, and
ProjFactor's two means over the rows n (the column factor and the row normaliser) are all-reduced over the mesh.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn

from ..compress import merge
from ..compress.base import MERGE_BYTES_PER_ELEMENT, MERGE_CHUNK_BYTES, local, release
from ..errors import InvalidSettingsError

OPTIMIZER_KINDS = ("projfactor", "adamw")


def _check_hparams(lr, betas, eps, weight_decay, kind):
    def bad(x):
        return not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x) or x < 0

    if bad(lr):
        raise InvalidSettingsError(f"lr={lr!r} must be a finite non-negative number (e.g. 1e-4).")
    if bad(eps) or bad(weight_decay):
        raise InvalidSettingsError(f"eps={eps!r} and weight_decay={weight_decay!r} must be finite non-negative numbers "
                                   "(defaults: 1e-8 and 0.0).")
    if not isinstance(betas, tuple | list) or len(betas) != 2 or any(bad(b) or b >= 1 for b in betas):
        raise InvalidSettingsError(f"betas={betas!r} must be two numbers in [0, 1), e.g. (0.9, 0.999).")
    if kind not in OPTIMIZER_KINDS:
        raise InvalidSettingsError(f"kind={kind!r} is unknown; use one of {', '.join(OPTIMIZER_KINDS)}.")


def _adamw_step(p, g, state, lr, beta1, beta2, eps, wd):
    """torch.optim.AdamW's single-tensor math, a block of rows at a time: its one temporary (the denominator) stays
    within MERGE_CHUNK_BYTES however large the parameter (an embedding, an lm_head)."""
    step = state["step"].add_(1).item()
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rows = p.shape[0] if p.ndim else 1
    per_row = max(1, p.numel() // max(rows, 1)) * exp_avg_sq.element_size()
    block = max(1, MERGE_CHUNK_BYTES // per_row) if p.ndim else 1
    for r0 in range(0, rows, block):
        sl = (slice(r0, r0 + block),) if p.ndim else ()
        pp, gg, m, v = p[sl], g[sl].to(exp_avg.dtype), exp_avg[sl], exp_avg_sq[sl]  # state keeps its dtype after a cast
        pp.mul_(1 - lr * wd)
        m.lerp_(gg, 1 - beta1)
        v.mul_(beta2).addcmul_(gg, gg, value=1 - beta2)
        denom = v.sqrt().div_(math.sqrt(bc2)).add_(eps)
        pp.addcdiv_(m, denom, value=-lr / bc1)


def _subspace_adamw_update(module, g, state, lr, beta1, beta2, eps, step) -> torch.Tensor:
    """The update in the subspace, (…, n, c, r): `module.merge` lifts it into W a block of rows at a time."""
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(g.to(exp_avg.dtype), 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    u = exp_avg.float() / (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)  # (…, n, c, r)
    return u.mul_(-lr / bc1)


def _row_mean(t: torch.Tensor, dim: int, rows=None, keepdim: bool = False) -> torch.Tensor:
    """Mean over the rows n; `rows` = (process groups, global n) when the rows are sharded (FSDP2)."""
    if rows is None:
        return t.mean(dim, keepdim=keepdim)
    total = t.sum(dim, keepdim=keepdim)
    for pg in rows[0]:
        dist.all_reduce(total, group=pg)
    return total.div_(rows[1])


def _projfactor_update(module, g, state, lr, beta1, beta2, eps, step, rows=None) -> torch.Tensor:
    exp_avg, row, col = state["exp_avg"], state["v_row"], state["v_col"]
    exp_avg.lerp_(g.to(exp_avg.dtype), 1 - beta1)
    sq = module.lifted(g).square_().add_(1e-30)  # Ĝ², (…, n, m)
    row.mul_(beta2).add_(sq.mean(-1), alpha=1 - beta2)  # (…, n)
    col.mul_(beta2).add_(_row_mean(sq, -2, rows), alpha=1 - beta2)  # (…, m)
    del sq
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    v = (row / _row_mean(row, -1, rows, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)  # rank-1 v̂, (…, n, m)
    denom = v.div_(bc2).sqrt_().add_(eps)
    return module.lifted(exp_avg).div_(denom).mul_(-lr / bc1)


def _projfactor_step(module, g, state, lr, beta1, beta2, eps, step, decay) -> None:
    """ProjFactor's update merged into W a block of rows at a time (every expert of a fused weight together), so its
    weight-shaped temporaries (Ĝ², v̂, the lifted moment: fp32) stay within MERGE_CHUNK_BYTES however large the weight.
    Two passes: the second-moment factors need every row (the column factor is a mean over them), then the update."""
    exp_avg, row, col = state["exp_avg"], state["v_row"], state["v_col"]
    *lead, n, _, _ = g.shape
    width = module.in_features * max(1, math.prod(lead))  # elements of one row, across the experts
    block = max(1, MERGE_CHUNK_BYTES // (width * MERGE_BYTES_PER_ELEMENT))
    exp_avg.lerp_(g.to(exp_avg.dtype), 1 - beta1)
    col_sum = torch.zeros_like(col)
    for r0 in range(0, n, block):
        sq = module.lifted(g[..., r0:r0 + block, :, :]).square_().add_(1e-30)  # Ĝ² of these rows, (…, b, m)
        row[..., r0:r0 + block].mul_(beta2).add_(sq.mean(-1), alpha=1 - beta2)
        col_sum.add_(sq.sum(-2))
        del sq
    col.mul_(beta2).add_(col_sum.div_(n), alpha=1 - beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    row_mean = row.mean(-1, keepdim=True)
    for r0 in range(0, n, block):
        v = (row[..., r0:r0 + block] / row_mean).unsqueeze(-1) * col.unsqueeze(-2)  # rank-1 v̂ of these rows
        denom = v.div_(bc2).sqrt_().add_(eps)
        delta = module.lifted(exp_avg[..., r0:r0 + block, :, :]).div_(denom).mul_(-lr / bc1)
        module.apply_delta_rows(delta, decay, step, r0)
        del v, denom, delta


class MemwrapOptimizer(torch.optim.Optimizer):
    """One optimizer over all trainable parameters of a wrapped model (see the module docstring)."""

    memwrap_owns_merge = True  # memwrap.merge's generic hook leaves these steps alone

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, kind="projfactor",
                 error_feedback=False):
        _check_hparams(lr, betas, eps, weight_decay, kind)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, kind=kind,
                        error_feedback=bool(error_feedback), compressed=False)
        super().__init__(params, defaults)
        self._release_tried: set[int] = set()

    @classmethod
    def for_model(cls, model: nn.Module, *, lr, kind, betas, eps, weight_decay, error_feedback, no_decay):
        compressed = merge.units_of(model)
        coords_ids = {id(m.coords) for m in compressed}
        decay, plain = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in coords_ids:
                continue
            low = name.lower()
            (plain if p.ndim < 2 or any(k in low for k in no_decay) else decay).append(p)
        groups = [{"params": [m.coords for m in compressed], "compressed": True}]
        if decay:
            groups.append({"params": decay})
        if plain:
            groups.append({"params": plain, "weight_decay": 0.0})
        opt = cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, kind=kind,
                  error_feedback=error_feedback)
        # in a distributed run (a process group, or a launcher's WORLD_SIZE before it exists) DDP may yet broadcast
        # into them when it wraps the model: release them at the first step instead
        if not ((dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1):
            for m in compressed:
                opt._release_tried.add(id(m.coords))
                release(m.coords)
        return opt

    def _init_compressed_state(self, module, p, group):
        state = self.state[p]
        c = local(p)
        state["step"] = torch.zeros((), dtype=torch.float32)
        # the first moment in the coords' dtype (bf16 for a bf16 model, as plain bf16 AdamW keeps it; its β1 = 0.9
        # decay is far above bf16's resolution); second moments in fp32 (β2 = 0.999 would stall in bf16)
        state["exp_avg"] = torch.zeros_like(p, dtype=p.dtype)  # a DTensor like p under FSDP2
        lead, n, m = c.shape[:-3], c.shape[-3], module.lifted(c[..., :1, :, :]).shape[-1]
        if group["kind"] == "adamw":
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        else:
            state["v_row"] = _sharded_like(p, torch.zeros(*lead, n, device=c.device), (*p.shape[:-2],), keeps_rows=True)
            state["v_col"] = _sharded_like(p, torch.zeros(*lead, m, device=c.device), (*p.shape[:-3], m), keeps_rows=False)
        if group["error_feedback"]:
            state["residual"] = _sharded_like(p, torch.zeros(*lead, n, m, device=c.device), (*p.shape[:-2], m),
                                              keeps_rows=True)

    def load_state_dict(self, state_dict) -> None:
        """Restore state and move every compressed module to the refresh index of the restored step count.

        torch casts every floating state tensor to its parameter's dtype; a bf16 model's coords are bf16 while their
        second moments are fp32 (β2 = 0.999 would stall in bf16), so those keep the dtype they were saved in."""
        saved = state_dict["state"]
        keys = [k for g in state_dict["param_groups"] for k in g["params"]]  # indices, or names (DCP)
        super().load_state_dict(state_dict)
        by_key = dict(zip(keys, (p for g in self.param_groups for p in g["params"]), strict=False))
        compressed = {id(p) for g in self.param_groups if g.get("compressed") for p in g["params"]}
        for key_, values in saved.items():
            p = by_key.get(key_)
            if p is None or id(p) not in compressed:
                continue
            state = self.state[p]
            for key, value in values.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point() \
                        and key in state and state[key].dtype != value.dtype:
                    state[key] = value.to(device=state[key].device)
        merge.sync(self)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_id = merge.layers_by_coords()
        held = [(p, by_id[id(p)]) for g in self.param_groups if g["compressed"] for p in g["params"]
                if p.grad is not None and id(p) in by_id]
        if not merge.nonfinite_check(self, held):
            return loss  # skipped whole: no parameter, moment or step count changes
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                module = by_id.get(id(p)) if group["compressed"] else None
                if module is None:
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    _adamw_step(p, p.grad, state, lr, beta1, beta2, eps, wd)
                    continue
                if not self.state[p]:
                    self._init_compressed_state(module, p, group)
                state = {k: local(v) for k, v in self.state[p].items()}  # the local shards under FSDP2
                g = local(p.grad).float()
                step = int(state["step"].add_(1).item())
                rows = _sharded_rows(p)
                if group["kind"] == "adamw":
                    update = _subspace_adamw_update(module, g, state, lr, beta1, beta2, eps, step)
                    module.merge(update, 1.0 - lr * wd, step)  # lifted a block of rows at a time
                elif rows is None:  # a block of rows at a time
                    _projfactor_step(module, g, state, lr, beta1, beta2, eps, step, 1.0 - lr * wd)
                else:  # rows sharded over ranks (FSDP2: the means are all-reduced): whole
                    update = _projfactor_update(module, g, state, lr, beta1, beta2, eps, step, rows)
                    module.apply_delta(update, 1.0 - lr * wd, step)
                self._refresh(module, state, step, group)
                if id(p) not in self._release_tried:  # coords stay zero under this optimizer: keep only their grad
                    self._release_tried.add(id(p))
                    release(p)
        return loss

    def _refresh(self, module, state, step, group):  # state: the local shards
        old_index = module.refresh_index
        module.steps = step  # memwrap's counter follows this optimizer's own
        t = module.advance(step)
        if t is None:
            return
        if not group["error_feedback"]:
            merge.carry(state["exp_avg"], t)
            return
        total = module.lifted(state["exp_avg"], index=old_index).add_(state["residual"])  # (…, n, m)
        p_new = module.group.projection(module.refresh_index, device=total.device)
        c = state["exp_avg"].shape[-2]
        blocks = total.reshape(*total.shape[:-1], c, -1)  # (…, n, c, d)
        coords = blocks @ p_new @ torch.linalg.inv(p_new.T @ p_new)  # least squares, (…, n, c, r)
        state["exp_avg"].copy_(coords)
        state["residual"].copy_(total - module.lifted(coords))


def _sharded_rows(p):
    """(process groups, global n) when coords `p` (…, n, c, r) is a DTensor sharded on its rows n, else None."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return None
    n_dim = p.ndim - 3
    groups = [p.device_mesh.get_group(i) for i, pl in enumerate(placements) if pl.is_shard() and pl.dim == n_dim]
    return (groups, p.shape[n_dim]) if groups else None


def _sharded_like(p, local_tensor: torch.Tensor, global_shape: tuple, *, keeps_rows: bool) -> torch.Tensor:
    """State derived from coords `p` (…, n, c, r) as a DTensor sharded like p (plain tensor when p is plain).

    The state keeps p's leading dims (and, if keeps_rows, the rows n); a shard of p on a dim it drops is Replicate."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return local_tensor
    from torch.distributed.tensor import DTensor, Replicate

    kept = p.ndim - 2 if keeps_rows else p.ndim - 3
    new = tuple(pl if not pl.is_shard() or pl.dim < kept else Replicate() for pl in placements)
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(local_tensor, p.device_mesh, new, run_check=False, shape=torch.Size(global_shape),
                              stride=stride)
