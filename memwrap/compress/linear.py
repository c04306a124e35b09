"""CompressedLinear: a linear layer that saves only x̃ = reshape(x, N, c, d) @ P and trains through `coords`.

y = x (W + lift(coords))ᵀ + b with coords (n × c × r) zero at every forward, so the lift is skipped and the
gradient of coords is exactly G_s = dYᵀ x̃, the weight gradient G projected by P. W itself is frozen; the
update reaches it through `merge`, called after each optimizer step (see memwrap.merge).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .projection import draw_projection, projection_seed, subspace_transfer


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: autocast's when autocast is on for x's device, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return x.dtype


class InputGroup:
    """Layers that read the same input tensor (q/k/v, gate/up): one P, one x̃ per forward.

    P is regenerated from (seed, crc32(group name), refresh index) and cached per (index, device, dtype).
    """

    def __init__(self, name: str, in_features: int, c: int, r: int, projection: str, seed: int):
        self.name, self.in_features, self.c, self.r = name, in_features, c, r
        self.d = in_features // c
        self.projection_kind, self.seed = projection, seed
        self.refresh_index = 0
        self._p_cache: dict[tuple, torch.Tensor] = {}
        self._x_cache: tuple | None = None  # (weakref x, x._version, dtype, weakref x̃)

    def projection(self, index: int | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
        """P (d × r) for a refresh index (default: the current one)."""
        index = self.refresh_index if index is None else index
        key = (index, str(device), dtype)
        p = self._p_cache.get(key)
        if p is None:
            if len(self._p_cache) > 8:
                self._p_cache.clear()
            base = draw_projection(self.d, self.r, self.projection_kind, self.seed, self.name, index)
            p = base.to(device=device, dtype=dtype)
            self._p_cache[key] = p
        return p

    def transfer(self, old_index: int, new_index: int, device=None) -> torch.Tensor:
        """T (r × r): subspace coordinates under P_old times T are the nearest coordinates under P_new."""
        return subspace_transfer(self.projection(old_index), self.projection(new_index)).to(device)

    def compress(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x̃ = reshape(x, N, c, d) @ P, shape (N, c, r); reused while the same x is fed to a sibling."""
        cached = self._x_cache
        if cached is not None:
            xref, version, cdt, tref = cached
            x_tilde = tref()
            if xref() is x and version == x._version and cdt == dtype and x_tilde is not None:
                return x_tilde
        with torch.no_grad():
            p = self.projection(device=x.device, dtype=dtype)
            x2 = x.detach().to(dtype).reshape(-1, self.d)  # (N·c, d): every block of every token, one GEMM
            x_tilde = (x2 @ p).reshape(-1, self.c, self.r)  # (N, c, r)
        self._x_cache = (weakref.ref(x), x._version, dtype, weakref.ref(x_tilde))
        return x_tilde


class _CompressedLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b; saves (W, x̃) only. Backward: exact dX and db, G_s = dYᵀ x̃ as the gradient of coords."""

    @staticmethod
    def forward(ctx, x, weight, bias, coords, x_tilde, cdt, transposed=False):
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(cdt)
            y = F.linear(x.to(cdt), w.t() if transposed else w, None if bias is None else bias.to(cdt))
        ctx.save_for_backward(weight, x_tilde)
        ctx.transposed = transposed
        ctx.x_meta = (x.shape, x.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.coords_dtype = coords.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, x_tilde = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, n)
        dx = db = dcoords = None
        if ctx.needs_input_grad[0]:
            w = weight.to(dy2.dtype)
            dx = (dy2 @ (w.t() if ctx.transposed else w)).reshape(x_shape).to(x_dtype)  # exact: (N, n) @ (n, m)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            n, (N, c, r) = dy2.shape[1], x_tilde.shape
            g_s = dy2.to(x_tilde.dtype).T @ x_tilde.reshape(N, c * r)  # G_s = dYᵀ x̃: (n, N) @ (N, c·r)
            dcoords = g_s.reshape(n, c, r).to(ctx.coords_dtype)
        return dx, None, db, dcoords, None, None, None


def lift(coords: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(…, n, c, r) coordinates -> (…, n, c·d) weight-shaped tensor: reshape(coords @ Pᵀ)."""
    *lead, n, c, r = coords.shape
    return (coords @ p.T.to(coords.dtype)).reshape(*lead, n, c * p.shape[0])


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """float32 -> bfloat16 rounding up or down with probability proportional to the distance (unbiased)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, decay: float, *, stochastic: bool,
                  seed: int, name: str, step: int) -> None:
    """weight ← weight·decay + delta in place (decay = 1 − lr·wd), stochastically rounded for bf16 weights."""
    w = local(weight)
    with torch.no_grad():
        if w.dtype == torch.bfloat16 and stochastic:
            g = torch.Generator(device=w.device).manual_seed(projection_seed(seed, name + "#round", step))
            exact = w.float() * decay + delta.float()
            w.copy_(stochastic_round_bf16(exact, g))
        else:
            if decay != 1.0:
                w.mul_(decay)
            w.add_(delta.to(w.dtype))


class CompressedLinear(nn.Module):
    """Drop-in replacement of an nn.Linear (same weight and bias Parameter objects, same state_dict keys).

    The protocol every compressed module follows (memwrap.merge and memwrap.optim rely on it): attributes
    `coords`, `group` (an InputGroup), `layer_name`, `refresh_index`, `refresh_every`; methods
    `lifted(coords, index=None)` -> weight-shaped tensor, `apply_delta(delta, decay, step)`, `merge(...)`.
    """

    def __init__(self, base: nn.Module, name: str, c: int, r: int, group: InputGroup, *,
                 refresh_every: int = 25, stochastic_rounding: bool = True):
        super().__init__()
        self.refresh_every = refresh_every
        # nn.Linear keeps weight as (out, in); GPT-2's Conv1D as (in, out)
        self.transposed = not isinstance(base, nn.Linear)
        self.out_features, self.in_features = base.weight.shape[::-1] if self.transposed else base.weight.shape
        self.layer_name, self.c, self.r, self.group = name, c, r, group
        self.stochastic_rounding = stochastic_rounding
        self.weight = base.weight
        self.bias = base.bias
        dev = base.weight.device
        self.coords = nn.Parameter(torch.zeros(self.out_features, c, r, device=dev, dtype=torch.float32))
        object.__setattr__(self, "_memwrap_base", base)  # restored by unwrap; not a submodule
        self._weight_requires_grad = base.weight.requires_grad
        self.refresh_index = 0
        self._register_state_dict_hook(_drop_coords)

    @property
    def d(self) -> int:
        return self.in_features // self.c

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"c={self.c}, r={self.r}, group={self.group.name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.coords.requires_grad):
            if self.transposed:  # Conv1D: x @ W + b
                return torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight).reshape(*x.shape[:-1], -1)
            return F.linear(x, self.weight, self.bias)
        if self not in merge._LAYERS:  # a deepcopy or an unpickled copy: make its optimizer steps merge too
            merge.register(self)
        cdt = compute_dtype(x)
        x_tilde = self.group.compress(x, cdt)
        return _CompressedLinearFn.apply(x, self.weight, self.bias, self.coords, x_tilde, cdt, self.transposed)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "coords" in missing_keys:
            missing_keys.remove(prefix + "coords")

    # ---- the update path -------------------------------------------------------------------------
    def lifted(self, coords: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """Weight-shaped (n × m) lift of subspace coordinates under P of `index` (default: current)."""
        c = local(coords)
        p = self.group.projection(self.refresh_index if index is None else index, device=c.device, dtype=torch.float32)
        return lift(c.float(), p)

    def apply_delta(self, delta: torch.Tensor, decay: float, step: int) -> None:
        """W ← W·decay + delta, delta weight-shaped (n × m)."""
        add_to_weight(self.weight, delta.t() if self.transposed else delta, decay, stochastic=self.stochastic_rounding,
                      seed=self.group.seed, name=self.layer_name, step=step)

    def merge(self, delta_coords: torch.Tensor, decay: float, step: int) -> None:
        """W ← W·decay + lift(delta_coords)."""
        self.apply_delta(self.lifted(delta_coords), decay, step)


from . import merge  # noqa: E402  (merge imports `local` from this module)


def _drop_coords(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "coords", None)
    return state_dict
