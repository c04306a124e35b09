"""Hand-written backward for the element-wise parts of a block: RMSNorm and act(gate)·up.

Each keeps only what its backward needs (a norm: its input and one fp32 statistic per row; a gated activation:
gate and up) and recomputes the rest there with the ops autograd itself runs, in its order (`silu_backward`,
`gelu_backward`, the RMSNorm chain rule), so outputs and gradients are bit-identical to plain training's. One
exception: an RMSNorm whose input is already fp32 hands autograd that input itself, so plain training adds the
norm's two internal gradients into the residual stream's one by one, an order no single Function can reproduce;
there (fp32 training) memwrap recomputes the norm with checkpoint instead, and the Function serves bf16/fp16.
Python-op activations (GPT-2's tanh GELU) match their closed form's derivative to rounding, not bit for bit: they
too take the Function below fp32 only. Cheaper than `torch.utils.checkpoint` (no second forward under autograd,
no saved-tensor hooks) and traced by torch.compile like any autograd.Function.

Which formula a module follows is found once, at wrap time, by comparing the module's own output on a random
input (`norm_mode`, `act_kind`); a module that matches none keeps the checkpointed recomputation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# ---- RMSNorm -------------------------------------------------------------------------------------------------
# y from n̂ = x·rsqrt(mean(x²) + eps) (in fp32), by where the weight is applied:
#   "llama"  w · n̂.to(dtype)              (Llama, Mistral, Qwen2/3, Mixtral, Qwen3-MoE, Phi-3, DeepSeek-V3, ...)
#   "gemma"  (n̂ · (1 + w.float())).to(dtype)
#   "fp32"   (w · n̂).to(dtype)             (Olmo2 and kin: the weight applied before the cast)
NORM_MODES = ("llama", "gemma", "fp32")


def _norm_out(mode: str, n_hat: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mode == "llama":
        return weight * n_hat.to(dtype)
    if mode == "gemma":
        return (n_hat * (1.0 + weight.float())).to(dtype)
    return (weight * n_hat).to(dtype)


def _rstd(xf: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """Reduce a weight gradient over every leading dimension, as autograd reduces a broadcast operand's."""
    return t.sum(tuple(range(t.dim() - 1))) if t.dim() > 1 else t


class RMSNormFn(torch.autograd.Function):
    """y = RMSNorm(x; w); saves x (its own dtype) and rstd (fp32, one per row)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, mode: str):
        xf = x.to(torch.float32)
        rstd = _rstd(xf, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mode = mode
        return _norm_out(mode, xf * rstd, weight, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xf = x.to(torch.float32)
        n_hat = xf * rstd
        dweight = None
        if ctx.mode == "llama":  # y = w · n, n = n̂.to(dtype)
            if ctx.needs_input_grad[1]:
                dweight = _sum_rows(dy * n_hat.to(x.dtype)).to(weight.dtype)
            dn_hat = (dy * weight).to(x.dtype).to(torch.float32)
        else:  # the weight applied in fp32, then the cast
            dyf = dy.to(torch.float32)
            if ctx.needs_input_grad[1]:
                dweight = _sum_rows(dyf * n_hat).to(weight.dtype)
            dn_hat = dyf * ((1.0 + weight.float()) if ctx.mode == "gemma" else weight)
        dx = None
        if ctx.needs_input_grad[0]:  # n̂ = x·r, r = (v + eps)^(-1/2), v = mean(x²): autograd's ops, in its order
            dr = (dn_hat * xf).sum(-1, keepdim=True)  # the mul's backward for r, reduced to its shape
            dv = (-0.5 * dr) * rstd.pow(3)  # rsqrt's backward
            dsq = dv.expand(xf.shape) / xf.shape[-1]  # mean's backward
            dx = (dn_hat * rstd + dsq * (2.0 * xf)).to(x.dtype)  # the mul's gradient arrives first, then pow's
        return dx, dweight, None, None


def norm_eps(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None


def norm_mode(module: nn.Module) -> str | None:
    """The formula an RMSNorm module follows, by its output on a random input (bit-identical), else None."""
    weight, eps = getattr(module, "weight", None), norm_eps(module)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 1 or eps is None:
        return None
    if weight.device.type == "meta":  # (memwrap.simulate) the same check on a CPU twin with random weights
        module = copy.deepcopy(module).to_empty(device="cpu")
        weight = module.weight
        with torch.no_grad():
            weight.copy_(probe(weight.shape, weight, seed=2))
    x = probe((5, weight.shape[0]), weight)
    with torch.no_grad():
        try:
            own = type(module).forward(module, x)
        except (TypeError, RuntimeError, ValueError):
            return None
        for mode in NORM_MODES:
            if own.dtype == x.dtype and torch.equal(own, RMSNormFn.apply(x, weight, eps, mode)):
                return mode
    return None


def rms_norm(module: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    return RMSNormFn.apply(x, module.weight, norm_eps(module), mode)


# ---- act(gate) · up ------------------------------------------------------------------------------------------
# The activation's own module computes the forward (bit-identical output); its derivative is the aten op autograd
# runs for the closed form the module matches.
ACT_KINDS = {
    "silu": (F.silu, lambda g, x: torch.ops.aten.silu_backward(g, x)),
    "gelu": (F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none")),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
    "relu": (F.relu, lambda g, x: torch.where(x > 0, g, torch.zeros_like(g))),
}


def _act_grad(kind: str, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ACT_KINDS[kind][1](grad, x)


class GatedActFn(torch.autograd.Function):
    """h = act(gate) · up, from separate gate and up (keeps both) or one fused gate_up (keeps it)."""

    @staticmethod
    def forward(ctx, gate_up, up, act, kind: str):
        gate, up_ = (gate_up, up) if up is not None else gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, up)
        ctx.act, ctx.kind, ctx.fused = act, kind, up is None
        return act(gate) * up_

    @staticmethod
    def backward(ctx, dh):
        gate_up, up = ctx.saved_tensors
        gate, up_ = gate_up.chunk(2, dim=-1) if ctx.fused else (gate_up, up)
        dgate = _act_grad(ctx.kind, (dh * up_).to(gate.dtype), gate)  # the mul's backward, then act's
        dup = (dh * ctx.act(gate)).to(up_.dtype)
        if ctx.fused:
            return torch.cat([dgate, dup], dim=-1), None, None, None
        return dgate, dup, None, None


def gated_act(act, kind: str, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """act(gate) · up keeping only gate and up (or their fused tensor, `up=None`) for backward."""
    return GatedActFn.apply(gate, up, act, kind)


class ActFn(torch.autograd.Function):
    """act(x) keeping only x (an activation written in Python ops keeps several intermediates)."""

    @staticmethod
    def forward(ctx, x, act, kind: str):
        ctx.save_for_backward(x)
        ctx.kind = kind
        return act(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _act_grad(ctx.kind, dy, x), None, None


def act_kind(act, like: torch.Tensor, *, exact: bool = True) -> str | None:
    """The closed form an activation computes (bit-identical when exact, else to fp32 rounding), or None."""
    x = probe((64,), like) * 4
    with torch.no_grad():
        try:
            own = act(x)
        except (TypeError, RuntimeError, ValueError):
            return None
        for kind, (fn, _) in ACT_KINDS.items():
            ref = fn(x)
            if own.shape == ref.shape and own.dtype == ref.dtype and (
                    torch.equal(own, ref) if exact else torch.allclose(own.float(), ref.float(), rtol=1e-5, atol=1e-6)):
                return kind
    return None


def probe(shape, like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed random input of `shape` on `like`'s device and in its dtype (what wrap-time checks compare on); on the
    CPU for a meta `like` (memwrap.simulate: the checks need values, and parameter-free functions run anywhere)."""
    device = torch.device("cpu") if like.device.type == "meta" else like.device
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device).to(like.dtype)
