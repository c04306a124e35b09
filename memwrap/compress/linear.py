"""CompressedLinear: a linear layer that saves only x̃ = reshape(x, N, c, d) @ P and trains through `coords`.

y = x (W + lift(coords))ᵀ + b with coords (n × c × r) zero at every forward, so the lift is skipped and the
gradient of coords is exactly G_s = dYᵀ x̃, the weight gradient G projected by P. W itself is frozen; the
update reaches it through `merge`, called after each optimizer step (see memwrap.compress.merge); the
bookkeeping it shares with fused experts lives in memwrap.compress.base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import merge, quant
from .base import CompressedWeight, InputGroup, compute_dtype, coords_dtype, kept_dtype, no_autocast


class _CompressedLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b; saves (W, x̃) only. Backward: exact dX and db, G_s = dYᵀ x̃ as the gradient of coords."""

    @staticmethod
    def forward(ctx, x, weight, bias, coords, x_tilde, cdt, transposed=False, scale=None):
        with no_autocast(x.device):
            w = quant.dense(weight, scale, cdt, transposed)  # one layer dequantized at a time for an 8-bit W
            y = F.linear(x.to(cdt), w.t() if transposed else w, None if bias is None else bias.to(cdt))
        del w
        ctx.save_for_backward(weight, x_tilde, scale)
        ctx.transposed = transposed
        ctx.x_meta = (x.shape, x.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.coords_dtype = coords.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, x_tilde, scale = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, n)
        dx = db = dcoords = None
        if ctx.needs_input_grad[0]:
            w = quant.dense(weight, scale, dy2.dtype, ctx.transposed)
            dx = (dy2 @ (w.t() if ctx.transposed else w)).reshape(x_shape).to(x_dtype)  # exact: (N, n) @ (n, m)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            n, (N, c, r) = dy2.shape[1], x_tilde.shape
            g_s = dy2.to(x_tilde.dtype).T @ x_tilde.reshape(N, c * r)  # G_s = dYᵀ x̃: (n, N) @ (N, c·r)
            dcoords = g_s.reshape(n, c, r).to(ctx.coords_dtype)
        return dx, None, db, dcoords, None, None, None, None


class CompressedLinear(CompressedWeight, nn.Module):
    """Drop-in replacement of an nn.Linear (same weight and bias Parameter objects, same state_dict keys)."""

    def __init__(self, base: nn.Module, name: str, c: int, r: int, group: InputGroup, *,
                 refresh_every: int = 100, stochastic_rounding: bool = True):
        super().__init__()
        transposed = not isinstance(base, nn.Linear)  # nn.Linear keeps weight as (out, in); GPT-2's Conv1D as (in, out)
        out_features, in_features = base.weight.shape[::-1] if transposed else base.weight.shape
        self._init_compressed(name, in_features, out_features, c, r, group, refresh_every=refresh_every,
                              stochastic_rounding=stochastic_rounding, transposed=transposed,
                              weight_requires_grad=base.weight.requires_grad)
        self.weight = base.weight
        self.bias = base.bias
        dev = base.weight.device
        self.coords = nn.Parameter(torch.zeros(out_features, c, r, device=dev, dtype=coords_dtype(base.weight)))
        object.__setattr__(self, "_memwrap_base", base)  # restored by unwrap; not a submodule
        self._register_state_dict_hook(_drop_coords)
        self.sync_live()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"c={self.c}, r={self.r}, group={self.group.name!r}")

    def __setstate__(self, state) -> None:  # a deepcopy or an unpickled copy trains and unwraps like the original
        super().__setstate__(state)
        self._reset_after_copy()
        merge.register(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_pending()
        if not (torch.is_grad_enabled() and self.coords.requires_grad):
            w = self.weight if self.quant is None else self.dense_weight(compute_dtype(x))
            if self.transposed:  # Conv1D: x @ W + b
                return torch.addmm(self.bias, x.reshape(-1, self.in_features), w).reshape(*x.shape[:-1], -1)
            return F.linear(x, w, self.bias)
        cdt = compute_dtype(x)
        x_tilde = self.compress_input(x, cdt)
        return _CompressedLinearFn.apply(x, self.weight, self.bias, self.coords, x_tilde, cdt, self.transposed,
                                         self.scale)

    def _scale_owner(self) -> tuple:
        return self, quant.LINEAR_SCALE

    def _apply(self, fn, recurse=True):
        # a dtype cast of the model leaves the optimizer-facing coords (and an 8-bit W) as they are
        with kept_dtype([self.coords], exact=self.quantized_tensors()):
            return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "coords" in missing_keys:
            missing_keys.remove(prefix + "coords")


def _drop_coords(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "coords", None)
    return state_dict
