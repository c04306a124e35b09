"""Fused MoE experts (transformers 5.x `@use_experts_implementation` classes) with compressed inputs.

Each fused weight (`gate_up_proj` / `up_proj` and `down_proj`, E experts of n × m, stored as [E, n, m] or
transposed [E, m, n]) becomes an `ExpertsUnit`: a `coords` parameter of shape (E, n, c, r) registered on the
experts module, a frozen weight, and one P per fused weight (shared by its experts, so inputs are compressed
before they are grouped). The forward pass is transformers' grouped-matmul algorithm with the two projections
replaced by `_ExpertsLinearFn`, which saves only x̃ of the routed tokens (S × c·r, S = tokens × top_k) and
gives exact input gradients, exact routing-weight gradients (through autograd, untouched) and G_s per expert.

The implementation is registered in transformers' own `ExpertsInterface` under the name "memwrap" and selected
per model instance with `model.set_experts_implementation("memwrap")`; unwrap restores the previous choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedArchitectureError
from . import merge, quant
from .base import CompressedWeight, InputGroup, compute_dtype, coords_dtype, kept_dtype, no_autocast
from .blocks import FORMULA_ATTR, SAVINGS_ATTR, recompute
from .elementwise import gated_act

IMPLEMENTATION = "memwrap"
UNITS_ATTR = "_memwrap_experts"  # {param name: ExpertsUnit} on a wrapped experts module
EXPERT_PARAM_NAMES = ("gate_up_proj", "up_proj", "down_proj", "w1", "w2", "w3", "experts_weight")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module dispatched through `use_experts_implementation`."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "has_bias", "_apply_gate", "num_experts")) \
        and isinstance(getattr(module, "down_proj", None), nn.Parameter)


# What the experts attributes mean in each transformers version memwrap supports (the tested range is in
# memwrap.versions). An attribute a version does not set is read with that version's meaning, not as missing.
def expert_parallel(module: nn.Module) -> bool:
    """The experts are sharded over expert-parallel ranks (this rank holds num_experts of them)."""
    flag = getattr(module, "_is_expert_parallel", None)  # transformers >= 5.18: set where its EP sharding splits experts
    if flag is not None:
        return bool(flag)
    # transformers < 5.18 marks nothing on the module: EP is the model's distributed_config.enable_expert_parallel
    dist = getattr(getattr(module, "config", None), "distributed_config", None)
    return bool(getattr(dist, "enable_expert_parallel", False))


def post_expert_norm(module: nn.Module) -> bool:
    """A norm follows each expert's down projection (transformers >= 5.20 `has_post_expert_norm`; none before)."""
    return bool(getattr(module, "has_post_expert_norm", False))


def fused_params(module: nn.Module) -> list[str]:
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


def expert_shape(module: nn.Module, pname: str) -> tuple[int, int, int]:
    """(E, n, m) of a fused weight: E experts mapping m inputs to n outputs."""
    w = getattr(module, pname)
    e, a, b = w.shape
    return (e, b, a) if module.is_transposed else (e, a, b)


def unknown_expert_weights(module: nn.Module) -> list[tuple[str, tuple]]:
    """3-D float parameters of a non-fused-experts module that look like expert weights (unknown layout)."""
    if is_fused_experts(module) or isinstance(module, nn.modules.conv._ConvNd):
        return []
    looks_moe = any(k in type(module).__name__.lower() for k in ("expert", "moe"))
    return [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False)
            if p.ndim == 3 and p.is_floating_point() and p.requires_grad and (looks_moe or n in EXPERT_PARAM_NAMES)]


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped matmul over experts (rows of `a` sorted by expert, `offs` the cumulative counts).

    a (S, k) @ b (E, k, n) -> (S, n); or a (k, S) @ b (S, n) -> (E, k, n) (the per-expert weight-gradient
    shape). Uses torch's grouped_mm kernel where it applies, else one mm per expert, like transformers. Under
    torch.compile it is one opaque custom op (`memwrap::grouped_mm`) whose output shape the compiler knows.
    """
    if torch.compiler.is_compiling():
        return _grouped_mm_op()(a, b, offs)
    return _grouped_mm_eager(a, b, offs)


_OP = []  # memwrap::grouped_mm, registered when an MoE model is first wrapped


def _grouped_mm_op():
    if not _OP:
        op = torch.library.custom_op("memwrap::grouped_mm", mutates_args=())(_grouped_mm_eager)

        @op.register_fake
        def _(a, b, offs):
            if b.dim() == 3:
                return a.new_empty(a.shape[0], b.shape[-1])
            return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])

        _OP.append(op)
    return _OP[0]


def _grouped_mm_eager(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if hasattr(F, "grouped_mm"):
        try:
            return F.grouped_mm(a, b, offs=offs)
        except (RuntimeError, NotImplementedError):
            pass
    if a.device.type == "meta":  # (memwrap.simulate) the fallback's output bytes; there are no counts to split by
        shape = (a.shape[0], b.shape[-1]) if b.dim() == 3 else (offs.shape[0], a.shape[0], b.shape[-1])
        return a.new_zeros(shape)
    bounds = [0] + offs.tolist()
    if b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[-1])
        for e in range(b.shape[0]):
            s, t = bounds[e], bounds[e + 1]
            if t > s:
                torch.mm(a[s:t], b[e], out=out[s:t])
        return out
    out = a.new_zeros(len(bounds) - 1, a.shape[0], b.shape[-1])
    for e in range(len(bounds) - 1):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            torch.mm(a[:, s:t], b[s:t], out=out[e])
    return out


class _ExpertsLinearFn(torch.autograd.Function):
    """y_s = x_s W_eᵀ for each routed row s of expert e; saves (W, x̃, offs). dX exact; G_s[e] = dY_eᵀ x̃_e."""

    @staticmethod
    def forward(ctx, x, weight, coords, x_tilde, offs, transposed, cdt, scale=None):
        with no_autocast(x.device):
            w = quant.dense(weight, scale, cdt, transposed)  # an 8-bit W dequantized (every expert of this tensor)
            y = grouped_mm(x.to(cdt), w if transposed else w.transpose(-1, -2), offs)  # (S, m) @ (E, m, n)
        del w
        ctx.save_for_backward(weight, x_tilde, offs, scale)
        ctx.meta = (transposed, x.dtype, coords.dtype, coords.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, x_tilde, offs, scale = ctx.saved_tensors
        transposed, x_dtype, coords_dtype, coords_shape = ctx.meta
        dx = dcoords = None
        if ctx.needs_input_grad[0]:
            w = quant.dense(weight, scale, dy.dtype, transposed)
            dx = grouped_mm(dy, w.transpose(-1, -2) if transposed else w, offs).to(x_dtype)  # (S, n) @ (E, n, m)
        if ctx.needs_input_grad[2]:
            g_s = grouped_mm(dy.to(x_tilde.dtype).T, x_tilde, offs)  # (n, S) @ (S, c·r) -> (E, n, c·r)
            dcoords = g_s.reshape(coords_shape).to(coords_dtype)
        return dx, None, dcoords, None, None, None, None, None


class ExpertsUnit(CompressedWeight):
    """One compressed fused expert weight (E experts of n × m); coords (E, n, c, r) registered on the experts module."""

    def __init__(self, module: nn.Module, module_name: str, pname: str, c: int, r: int, group: InputGroup, *,
                 refresh_every: int = 100, stochastic_rounding: bool = True):
        self.module, self.pname = module, pname
        self.num_experts, out_features, in_features = expert_shape(module, pname)
        w = getattr(module, pname)
        self._init_compressed(f"{module_name}.{pname}", in_features, out_features, c, r, group,
                              refresh_every=refresh_every, stochastic_rounding=stochastic_rounding,
                              transposed=bool(module.is_transposed), weight_requires_grad=w.requires_grad)
        self.coords_name = f"{pname}_memwrap_coords"
        self.new_coords = nn.Parameter(torch.zeros(self.num_experts, out_features, c, r, device=w.device,
                                                   dtype=coords_dtype(w)))
        self.sync_live()

    def __setstate__(self, state) -> None:  # a deepcopy or an unpickled copy trains and unwraps like the original
        self.__dict__.update(state)
        self._reset_after_copy()
        register_implementation()
        merge.register(self)

    @property
    def coords(self) -> nn.Parameter:
        return getattr(self.module, self.coords_name)

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.pname)

    def _scale_owner(self) -> tuple:
        return self.module, quant.expert_scale(self.pname)


def memwrap_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped-mm experts algorithm with compressed saved inputs (exact where nothing is saved)."""
    units = getattr(self, UNITS_ATTR, None)
    for u in (units or {}).values():
        u.check_pending()
    if not units or (not (torch.is_grad_enabled() and any(u.coords.requires_grad for u in units.values()))
                     and not any(u.quant is not None for u in units.values())):  # (8-bit W: this forward dequantizes)
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if expert_parallel(self):
        raise UnsupportedArchitectureError(f"{type(self).__name__}: expert parallelism is not supported by memwrap yet; "
                                           "unwrap the model or train without expert parallelism.")
    num_tokens, top_k = hidden_states.shape[0], top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)  # (S,)
    expert_ids_g, perm = torch.sort(expert_ids, stable=True)
    token_g = perm // top_k
    counts = torch.zeros(self.num_experts, dtype=torch.int64, device=expert_ids_g.device)
    offs = counts.index_add_(0, expert_ids_g, torch.ones_like(expert_ids_g)).cumsum(0).to(torch.int32)  # static shape
    cdt = compute_dtype(hidden_states)
    up = units["gate_up_proj" if self.has_gate else "up_proj"]
    down = units["down_proj"]

    x_tilde = up.compress_input(hidden_states, cdt).reshape(num_tokens, -1)[token_g]  # T rows -> S
    h = _project(up, hidden_states[token_g], x_tilde, offs, cdt)  # (S, n_up)
    if self.has_bias:
        h = h + getattr(self, up.pname + "_bias")[expert_ids_g]
    act = self._apply_gate if self.has_gate else self.act_fn
    formula = self.__dict__.get(FORMULA_ATTR)
    if formula:  # act(gate)·up keeping only gate_up, hand-written backward
        h = gated_act(self.act_fn, formula, h)
    else:  # (S, I); recompute: keep only its input
        h = recompute(act, h) if SAVINGS_ATTR in self.__dict__ else act(h)
    h_tilde = down.compress_input(h, cdt).reshape(h.shape[0], -1)
    out = _project(down, h, h_tilde, offs, cdt)  # (S, H)
    if self.has_bias:
        out = out + self.down_proj_bias[expert_ids_g]
    if post_expert_norm(self):
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    out = out[inv].view(num_tokens, top_k, -1).sum(dim=1)
    return out.to(hidden_states.dtype)


def _project(unit: ExpertsUnit, x, x_tilde, offs, cdt):
    """One fused weight applied to the routed rows x (sorted by expert), saving only x_tilde."""
    return _ExpertsLinearFn.apply(x, unit.weight, unit.coords, x_tilde, offs, unit.transposed, cdt, unit.scale)


def register_implementation() -> None:
    """Add "memwrap" to transformers' ExpertsInterface (its sanctioned extension point); idempotent."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(IMPLEMENTATION, memwrap_experts_forward)
    _grouped_mm_op()  # registered here, not while torch.compile traces (registration cannot be traced)


def _drop_unit_coords(module, state_dict, prefix, local_metadata):
    for unit in getattr(module, UNITS_ATTR, {}).values():
        state_dict.pop(prefix + unit.coords_name, None)
    return state_dict


def _accept_missing_coords(module, incompatible_keys):
    names = {unit.coords_name for unit in getattr(module, UNITS_ATTR, {}).values()}
    for key in list(incompatible_keys.missing_keys):
        if key.rsplit(".", 1)[-1] in names:
            incompatible_keys.missing_keys.remove(key)


def attach(module: nn.Module, units: list[ExpertsUnit]) -> None:
    """Register coords, freeze the fused weights, install the state-dict hooks (the only mutation)."""
    for unit in units:
        module.register_parameter(unit.coords_name, unit.new_coords)
        del unit.new_coords
        unit.weight.requires_grad_(False)
    object.__setattr__(module, UNITS_ATTR, {u.pname: u for u in units})
    handles = [module._register_state_dict_hook(_drop_unit_coords),
               module.register_load_state_dict_post_hook(_accept_missing_coords)]
    object.__setattr__(module, "_memwrap_hook_handles", handles)
    object.__setattr__(module, "_apply", KeepCoordsApply(module))  # this instance only; detach removes it


class KeepCoordsApply:
    """The experts module's `_apply` while wrapped: its coords keep their dtype through model.to(dtype) (see kept_dtype).
    A plain object (not a bound method) so a deepcopy or pickle of the model carries it."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, fn, recurse=True):
        units = getattr(self.module, UNITS_ATTR, {}).values()
        with kept_dtype([u.coords for u in units], exact=[t for u in units for t in u.quantized_tensors()]):
            return type(self.module)._apply(self.module, fn, recurse)


def detach(module: nn.Module) -> list[ExpertsUnit]:
    """Merge anything pending, drop coords, unfreeze, remove hooks. Returns the units removed."""
    units = list(getattr(module, UNITS_ATTR, {}).values())
    for unit in units:
        unit.flush()
        unit.restore_dtype()
        delattr(module, unit.coords_name)
        unit.weight.requires_grad_(unit._weight_requires_grad)
    for h in getattr(module, "_memwrap_hook_handles", []):
        h.remove()
    for attr in (UNITS_ATTR, "_memwrap_hook_handles", "_apply"):
        if attr in module.__dict__:
            object.__delattr__(module, attr)
    return units
