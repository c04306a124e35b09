"""ProjFactor / subspace AdamW for compressed layers, AdamW for every other trainable parameter.

The class does the bookkeeping; `_projfactor_many`, `_subspace_adamw_many` (every compressed weight of one shape at
once, memwrap.compress.grouped), `_projfactor_update` (one weight whose rows FSDP2 shards) and `_adamw_many` (the
other parameters, foreach) do the math. State holds only tensors (`torch.load(..., weights_only=True)` restores it).

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

from ..compress import grouped, merge
from ..compress.base import MERGE_CHUNK_BYTES, local, release
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


def _adamw_many(params, grads, states, lr, beta1, beta2, eps, wd, step) -> None:
    """torch.optim.AdamW's math over many parameters at one step count, with foreach ops; its one temporary (the
    denominator) stays within MERGE_CHUNK_BYTES however large the parameters (a big one is taken a block of rows at a
    time). Parameters, gradients and states are local tensors of one device."""
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    entries = []  # (param, grad, exp_avg, exp_avg_sq) blocks
    for p, g, state in zip(params, grads, states, strict=True):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        rows = p.shape[0] if p.ndim else 1
        per_row = max(1, p.numel() // max(rows, 1)) * v.element_size()
        block = max(1, MERGE_CHUNK_BYTES // per_row) if p.ndim else 1
        for r0 in range(0, rows, block):
            sl = (slice(r0, r0 + block),) if p.ndim else ()
            entries.append((p[sl], g[sl], m[sl], v[sl], p[sl].numel() * v.element_size()))
    # one device and dtype per foreach call (a GPU runs a mixed list tensor by tensor), as torch's optimizers group them
    entries.sort(key=lambda e: (str(e[0].device), str(e[0].dtype), str(e[2].dtype)))
    wave, size, wave_kind = [], 0, None
    for entry in entries + [None]:
        kind = None if entry is None else (entry[0].device, entry[0].dtype, entry[2].dtype)
        if entry is None or (wave and (size + entry[4] > MERGE_CHUNK_BYTES or kind != wave_kind)):
            if wave:
                ps, gs, ms, vs = ([e[i] for e in wave] for i in range(4))
                if any(g.dtype != m.dtype for g, m in zip(gs, ms, strict=True)):  # state keeps its dtype after a cast
                    gs = [g.to(m.dtype) for g, m in zip(gs, ms, strict=True)]
                if lr * wd:
                    torch._foreach_mul_(ps, 1 - lr * wd)
                torch._foreach_lerp_(ms, gs, 1 - beta1)
                torch._foreach_mul_(vs, beta2)
                torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
                denom = torch._foreach_sqrt(vs)
                torch._foreach_div_(denom, math.sqrt(bc2))
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, ms, denom, value=-lr / bc1)
                del denom
            wave, size = [], 0
        if entry is not None:
            wave.append(entry)
            size += entry[4]
            wave_kind = kind


def _row_mean(t: torch.Tensor, dim: int, rows=None, keepdim: bool = False) -> torch.Tensor:
    """Mean over the rows n; `rows` = (process groups, global n) when the rows are sharded (FSDP2)."""
    if rows is None:
        return t.mean(dim, keepdim=keepdim)
    total = t.sum(dim, keepdim=keepdim)
    for pg in rows[0]:
        dist.all_reduce(total, group=pg)
    return total.div_(rows[1])


def _projfactor_update(module, g, state, lr, beta1, beta2, eps, step, rows=None) -> torch.Tensor:
    """ProjFactor's update of one weight (first moment already updated), whole: for weights whose rows FSDP2 shards,
    where the means over rows are all-reduced."""
    exp_avg, row, col = state["exp_avg"], state["v_row"], state["v_col"]
    sq = module.lifted(g).square_().add_(1e-30)  # Ĝ², (…, n, m)
    row.mul_(beta2).add_(sq.mean(-1), alpha=1 - beta2)  # (…, n)
    col.mul_(beta2).add_(_row_mean(sq, -2, rows), alpha=1 - beta2)  # (…, m)
    del sq
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    v = (row / _row_mean(row, -1, rows, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)  # rank-1 v̂, (…, n, m)
    denom = v.div_(bc2).sqrt_().add_(eps)
    return module.lifted(exp_avg).div_(denom).mul_(-lr / bc1)


def _projfactor_many(units, grads, states, lr, beta1, beta2, eps, step, decay, fused=False) -> None:
    """ProjFactor for many compressed weights at one step count (their first moments already updated), grouped by
    shape (memwrap.compress.grouped): its weight-shaped temporaries (Ĝ², v̂, the lifted moment: fp32) are built a wave
    at a time, within MERGE_CHUNK_BYTES. Two passes: the second-moment factors need every row (the column factor is a
    mean over them), then the update, merged into W as it is made.

    The rank-1 v̂ = (row / mean(row)) ⊗ col factors under the square root: with rs = −sqrt(row / (mean(row) · bc2 · s²)),
    cs = sqrt(col) and s = lr / bc1, the update −s · lift(m) / (sqrt(v̂ / bc2) + eps) is lift(m) / (rs ⊗ cs − eps / s):
    one outer product, one division."""
    buckets = grouped.buckets_of(units)
    by_id = {id(u): (g, st) for u, g, st in zip(units, grads, states, strict=True)}
    device = buckets[0].device
    row_shapes = [(len(b), *b.lead, b.n) for b in buckets]
    col_shapes = [(len(b), *b.lead, b.m) for b in buckets]
    n_rows = sum(math.prod(shape) for shape in row_shapes)
    stats = torch.zeros(n_rows + sum(math.prod(shape) for shape in col_shapes), dtype=torch.float32,
                        device=device)  # this step's Ĝ² means: every bucket's rows, then every bucket's columns
    row_stats = grouped.consecutive(stats[:n_rows], row_shapes)
    col_stats = grouped.consecutive(stats[n_rows:], col_shapes)
    where = {id(b): i for i, b in enumerate(buckets)}
    split = set()  # buckets whose column sums of squares are accumulated over row pieces
    for wave in grouped.waves_of(buckets):  # pass 1: the means of Ĝ² over columns (rows' factor) and rows (columns')
        flat, ys = grouped.wave_buffer(wave)
        for piece, y in zip(wave, ys, strict=True):
            i = where[id(piece.bucket)]
            piece.lift([by_id[id(u)][0] for u in piece.bucket.units], y)
            # norms read Ĝ once each (squaring it first would write and read it again): squared and scaled below
            torch.linalg.vector_norm(y, dim=-1, out=row_stats[i][piece.k0:piece.k1, ..., piece.r0:piece.r1])
            if piece.r1 - piece.r0 == piece.bucket.n:
                torch.linalg.vector_norm(y, dim=-2, out=col_stats[i][piece.k0:piece.k1])
            else:
                col_stats[i][piece.k0:piece.k1].add_(torch.linalg.vector_norm(y, dim=-2).square_())
                split.add(i)
        del flat, ys
    for i in split:
        col_stats[i].sqrt_()
    stats.square_()
    torch._foreach_mul_(row_stats + col_stats, [1 / b.m for b in buckets] + [1 / b.n for b in buckets])
    stats.add_(1e-30)
    kept = [by_id[id(u)][1]["v_row"] for b in buckets for u in b.units] + \
           [by_id[id(u)][1]["v_col"] for b in buckets for u in b.units]
    moments = torch.cat([t.reshape(-1) for t in kept])  # every v_row, then every v_col: the layout of `stats`
    moments.lerp_(stats, 1 - beta2)
    torch._foreach_copy_(kept, grouped.consecutive(moments, [t.shape for t in kept]))
    scale = lr / (1 - beta1**step)
    if scale == 0.0:
        return  # lr = 0: the moments move, the weights do not (and decay = 1)
    rows = grouped.consecutive(moments[:n_rows], row_shapes)
    cols = grouped.consecutive(torch.sqrt(moments[n_rows:]), col_shapes)
    means = [r.mean(-1, keepdim=True) for r in rows]
    torch._foreach_mul_(means, (1 - beta2**step) * scale * scale)
    rs_flat = torch.empty(n_rows, dtype=torch.float32, device=device)
    rs = grouped.consecutive(rs_flat, row_shapes)
    for r, mean, out in zip(rows, means, rs, strict=True):
        torch.div(r, mean, out=out)
    rs_flat.sqrt_().neg_()
    del stats, moments, means
    moment_of = {id(u): by_id[id(u)][1]["exp_avg"] for u in units}
    neg_eps = torch.full((), -eps / scale, dtype=torch.float32, device=device)
    for wave in grouped.waves_of(buckets):  # pass 2: the update, merged
        flat, ys = grouped.wave_buffer(wave)
        denom_flat, denoms = grouped.wave_buffer(wave)
        for piece, y, denom in zip(wave, ys, denoms, strict=True):
            i = where[id(piece.bucket)]
            piece.lift([moment_of[id(u)] for u in piece.bucket.units], y)
            torch.addcmul(neg_eps, rs[i][piece.k0:piece.k1, ..., piece.r0:piece.r1].unsqueeze(-1),
                          cols[i][piece.k0:piece.k1].unsqueeze(-2), out=denom)  # one pass: rs ⊗ cs − eps / s
        flat.div_(denom_flat)
        del denom_flat, denoms
        grouped.write(wave, flat, ys, decay, step, fused)


def _subspace_adamw_many(units, grads, states, lr, beta1, beta2, eps, step, decay, fused=False) -> None:
    """Subspace AdamW for many compressed weights at one step count (first moments already updated), a wave at a
    time: the second moments and the update m̂ / (sqrt(v̂) + eps) on each piece's stacked coordinates (float32, one
    dtype per kernel: a GPU runs each in one launch), lifted and merged."""
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    grad_of = {id(u): g for u, g in zip(units, grads, strict=True)}
    state_of = {id(u): st for u, st in zip(units, states, strict=True)}
    for wave in grouped.waves_of(grouped.buckets_of(units)):
        flat, ys = grouped.wave_buffer(wave)
        for piece, y in zip(wave, ys, strict=True):
            mine = piece.bucket.units
            g = piece.stacked([grad_of[id(u)] for u in mine])
            v = piece.stacked([state_of[id(u)]["exp_avg_sq"] for u in mine])
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            del g
            torch._foreach_copy_([piece.rows_of(state_of[id(u)]["exp_avg_sq"]) for u in piece.units], list(v.unbind(0)))
            update = piece.stacked([state_of[id(u)]["exp_avg"] for u in mine])
            update.div_(v.mul_(1 / bc2).sqrt_().add_(eps)).mul_(-lr / bc1)
            del v
            piece.lift_stacked(update, y)
        if lr != 0.0:
            grouped.write(wave, flat, ys, decay, step, fused)


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
        self._counts: dict[int, int] = {}  # id(param) -> its step count, mirrored on the host
        self.compile_step = False  # bf16 weights written by one compiled kernel per wave (memwrap.optimizer sets it)

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
        self._counts.clear()
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

    def _count(self, p) -> int:
        """Steps this optimizer has applied to `p`, kept on the host (the state's `step` tensor is read once, after a
        load: no host read inside a step)."""
        count = self._counts.get(id(p))
        if count is None:
            step = self.state[p].get("step")
            count = int(step) if step is not None else 0
        return count

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
            params = [p for p in group["params"] if p.grad is not None]
            if group["compressed"]:
                self._step_compressed(group, [(p, by_id[id(p)]) for p in params if id(p) in by_id])
                params = [p for p in params if id(p) not in by_id]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self._counts[id(p)] = 0
            by_count = _by_count(params, self._count)
            torch._foreach_add_([self.state[p]["step"] for p in params], 1)
            for count, ps in by_count.items():
                self._counts.update((id(p), count) for p in ps)
                _adamw_many([local(p) for p in ps], [local(p.grad) for p in ps],
                            [{k: local(v) for k, v in self.state[p].items()} for p in ps],
                            lr, beta1, beta2, eps, wd, count)
        return loss

    def _step_compressed(self, group, pairs) -> None:
        """Every compressed weight of a group with a gradient: first moments and step counts together, then the update
        grouped by step count and shape (ProjFactor's weights whose rows FSDP2 shards: one at a time)."""
        if not pairs:
            return
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p, module in pairs:
            if not self.state[p]:
                self._init_compressed_state(module, p, group)
                self._counts[id(p)] = 0
        by_count = _by_count([p for p, _ in pairs], self._count)
        states = {id(p): {k: local(v) for k, v in self.state[p].items()} for p, _ in pairs}  # FSDP2: the local shards
        grads = {id(p): local(p.grad) for p, _ in pairs}
        torch._foreach_add_([states[id(p)]["step"] for p, _ in pairs], 1)
        by_kind: dict = {}  # one device and dtype per foreach call
        for p, _ in pairs:
            by_kind.setdefault((grads[id(p)].device, grads[id(p)].dtype), []).append(p)
        for ps in by_kind.values():
            torch._foreach_lerp_([states[id(p)]["exp_avg"] for p in ps], [grads[id(p)] for p in ps], 1 - beta1)
        module_of = {id(p): m for p, m in pairs}
        for count, ps in by_count.items():
            self._counts.update((id(p), count) for p in ps)
            modules = [module_of[id(p)] for p in ps]
            if group["kind"] == "projfactor":
                rows = {id(p): _sharded_rows(p) for p in ps}
                for p, module in zip(ps, modules, strict=True):  # rows sharded over ranks (FSDP2: all-reduced means)
                    if rows[id(p)] is not None:
                        update = _projfactor_update(module, grads[id(p)].float(), states[id(p)], lr, beta1, beta2, eps,
                                                    count, rows[id(p)])
                        module.apply_delta(update, 1.0 - lr * wd, count)
                ps_modules = [(p, m) for p, m in zip(ps, modules, strict=True) if rows[id(p)] is None]
                run = _projfactor_many
            else:
                ps_modules = list(zip(ps, modules, strict=True))
                run = _subspace_adamw_many
            if ps_modules:
                run([m for _, m in ps_modules], [grads[id(p)] for p, _ in ps_modules],
                    [states[id(p)] for p, _ in ps_modules], lr, beta1, beta2, eps, count, 1.0 - lr * wd,
                    self.compile_step)
            carries = []
            for p, module in zip(ps, modules, strict=True):
                t = self._refresh(module, states[id(p)], count, group)
                if t is not None:
                    carries.append((states[id(p)]["exp_avg"], t))
            merge.carry_many(carries)
        for p, _ in pairs:
            if id(p) not in self._release_tried:  # coords stay zero under this optimizer: keep only their grad
                self._release_tried.add(id(p))
                release(p)

    def _refresh(self, module, state, step, group):  # state: the local shards
        """Move the weight's P to `step`; the r × r transfer its first moment needs (None: nothing to carry)."""
        old_index = module.refresh_index
        module.steps = step  # memwrap's counter follows this optimizer's own
        t = module.advance(step)
        if t is None:
            return
        if not group["error_feedback"]:
            return t  # the caller carries the first moments of every refreshed weight together
        total = module.lifted(state["exp_avg"], index=old_index).add_(state["residual"])  # (…, n, m)
        p_new = module.group.projection(module.refresh_index, device=total.device)
        c = state["exp_avg"].shape[-2]
        blocks = total.reshape(*total.shape[:-1], c, -1)  # (…, n, c, d)
        coords = blocks @ p_new @ torch.linalg.inv(p_new.T @ p_new)  # least squares, (…, n, c, r)
        state["exp_avg"].copy_(coords)
        state["residual"].copy_(total - module.lifted(coords))
        return None


def _by_count(params, count) -> dict[int, list]:
    """Parameters by the step count they reach at this step (almost always one count for all)."""
    out: dict[int, list] = {}
    for p in params:
        out.setdefault(count(p) + 1, []).append(p)
    return out


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
