"""8-bit base weights: a wrapped layer's frozen W stored as int8 or fp8 (e4m3) with one float32 scale per block of
the input dimension, and updated by unbiased stochastic rounding onto that grid.

W (logical n × m, or E experts of n × m) = q · s, with q the 8-bit values (stored in the weight's own orientation, in
the same Parameter object) and s (…, n, m / B) one scale per row and block of B inputs (B = 128 where m allows it),
kept in logical orientation next to the weight (`weight_scale` on a linear, `<name>_memwrap_scale` on fused experts),
so FSDP2 shards it with the weight's rows (or experts).

- Forward and backward dequantize one layer at a time straight into the activation dtype (`dense`): the transient is
  one layer's weight in that dtype.
- The merge writes `W ← Q(deq(W)·decay + lift(coords))` (`requantize`): Q rounds stochastically onto the 8-bit grid,
  so E[deq(W_new)] is the exact float32 update. A block whose absmax outgrows its scale gets a new scale first (its
  absmax / qmax, with GROWTH headroom so a slowly growing block is not re-rounded every step); the scale is a
  deterministic function of the exact values, so the rounding stays unbiased. Scales never shrink (a re-scaled block
  re-rounds every element once; keeping the scale keeps small updates cheap: an element far from its neighbours on
  the grid moves only with the probability its update asks for).
- Nearest rounding (`stochastic_rounding=False`) is there for the ablation: updates smaller than half a grid step
  are lost (docs/quality.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

BLOCK = 128  # inputs per scale (a divisor of m: 128, 64 or 32, else the whole row)
GROWTH = 1.125  # a block whose absmax outgrows its scale gets absmax / qmax times this
SCALE_BYTES = 4
LINEAR_SCALE = "weight_scale"  # a linear's scales: next to its `weight`


def expert_scale(pname: str) -> str:
    """The name of a fused expert weight's scales on its experts module."""
    return f"{pname}_memwrap_scale"


@dataclass(frozen=True)
class Format:
    name: str
    dtype: torch.dtype
    qmax: float  # the largest magnitude on the grid

    @property
    def table(self) -> torch.Tensor | None:
        """fp8: every finite value of the grid, ascending (for stochastic rounding); None for int8 (integers)."""
        if self.dtype == torch.int8:
            return None
        t = _TABLES.get(self.dtype)
        if t is None:
            vals = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(self.dtype).float()
            t = _TABLES[self.dtype] = torch.unique(vals[torch.isfinite(vals)])
        return t


_TABLES: dict = {}
FORMATS = {"int8": Format("int8", torch.int8, 127.0), "fp8": Format("fp8", torch.float8_e4m3fn, 448.0)}


def block_size(m: int) -> int:
    for b in (BLOCK, 64, 32):
        if m % b == 0:
            return b
    return m


def scale_numel(numel: int, in_features: int) -> int:
    return numel // block_size(in_features)


def weight_bytes(numel: int, in_features: int) -> int:
    """Bytes of an 8-bit weight of `numel` elements and its scales."""
    return numel + scale_numel(numel, in_features) * SCALE_BYTES


def logical(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return w.transpose(-1, -2) if transposed else w


def dequantize(q: torch.Tensor, scale: torch.Tensor, transposed: bool, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """W in logical orientation (…, n, m) and `dtype` from storage-oriented q and logical scales (…, n, m / B): each
    element q·s computed in float32 and rounded once to `dtype`, written straight into the result (its bytes are the
    only transient; eager int8 is one kernel: the product of the int8 values and the float32 scales into a `dtype`
    tensor; fp8, whose dtype torch does not promote, is an exact cast then an in-place product)."""
    ql = logical(q, transposed)
    nb = scale.shape[-1]

    def blocks(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (nb, t.shape[-1] // nb))

    s = scale.unsqueeze(-1)
    if torch.compiler.is_compiling():  # one expression: the compiler fuses it into one kernel
        return (blocks(ql.float()) * s).flatten(-2).to(dtype)
    out = torch.empty_like(ql, dtype=dtype)  # q's memory layout: a transposed q gives a transposed W
    if q.dtype == torch.int8:
        torch.mul(blocks(ql), s, out=blocks(out))
    else:  # every e4m3 value is exact in bf16, fp16 and float32
        out.copy_(ql)
        blocks(out).mul_(s)
    return out


def dense(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """The weight in `dtype` and its storage orientation: q itself cast when there is no scale (a weight kept as it
    was), else dequantized into `dtype` (one layer's transient: its bytes in `dtype`)."""
    if scale is None:
        return q.to(dtype)
    return logical(dequantize(q, scale, transposed, dtype), transposed)


def _round_grid(x: torch.Tensor, fmt: Format, stochastic: bool, generator) -> torch.Tensor:
    """x (float32, within ±qmax) onto the grid: to a neighbour with probability proportional to the distance
    (stochastic: unbiased), or to the nearest. Returns the grid values in fmt.dtype."""
    if fmt.dtype == torch.int8:
        if stochastic:
            u = torch.rand(x.shape, device=x.device, generator=generator)
            x = torch.floor(x.add_(u))
        else:
            x = torch.round(x)
        return x.clamp_(-fmt.qmax, fmt.qmax).to(torch.int8)
    if not stochastic:
        return x.clamp_(-fmt.qmax, fmt.qmax).to(fmt.dtype)
    table = fmt.table.to(x.device)
    x = x.clamp_(-fmt.qmax, fmt.qmax)
    hi_idx = torch.searchsorted(table, x).clamp_(1, table.numel() - 1)  # table[hi - 1] < x <= table[hi]
    hi = table[hi_idx]
    lo = table[hi_idx - 1]
    p_hi = (x - lo).div_(hi - lo)
    u = torch.rand(x.shape, device=x.device, generator=generator)
    return torch.where(u < p_hi, hi, lo).to(fmt.dtype)


def requantize(exact: torch.Tensor, scale: torch.Tensor, fmt: Format, stochastic: bool,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, new scale) for exact float32 logical values (…, n, m) under the current scales (…, n, m / B): a block
    whose absmax exceeds qmax · scale gets absmax / qmax · GROWTH first. `exact` is overwritten."""
    nb = scale.shape[-1]
    blocks = exact.unflatten(-1, (nb, exact.shape[-1] // nb))
    need = blocks.abs().amax(-1).div_(fmt.qmax)
    new_scale = torch.where(need > scale, need * GROWTH, scale)
    new_scale = torch.where(new_scale > 0, new_scale, torch.ones_like(new_scale))  # an all-zero block: any scale
    blocks.div_(new_scale.unsqueeze(-1))
    return _round_grid(exact, fmt, stochastic, generator), new_scale


def quantize_rows(wl: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of logical float rows (…, m): absmax scales per block, nearest rounding (the weights as given are
    the starting point; only updates must be unbiased). Works on meta tensors (memwrap.simulate)."""
    m = wl.shape[-1]
    b = block_size(m)
    blocks = wl.float().unflatten(-1, (m // b, b))
    scale = blocks.abs().amax(-1).div_(fmt.qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _round_grid((blocks / scale.unsqueeze(-1)).flatten(-2), fmt, False, None), scale


def quantize(w: torch.Tensor, fmt: Format, transposed: bool, chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in storage orientation, scales in logical orientation) of a float weight, a block of rows at a time (the
    transient stays within about `chunk_bytes`)."""
    lead, (n, m) = w.shape[:-2], logical(w, transposed).shape[-2:]
    if w.device.type == "meta" or w.numel() * 12 <= chunk_bytes:  # at once (meta: memwrap.simulate, no bytes)
        q, scale = quantize_rows(logical(w, transposed), fmt)
        return logical(q, transposed).contiguous(), scale.contiguous()
    q = torch.empty(w.shape, dtype=fmt.dtype, device=w.device)
    scale = torch.empty(*lead, n, m // block_size(m), dtype=torch.float32, device=w.device)
    rows = max(1, min(n, chunk_bytes // max(1, m * 12)))
    for idx in itertools.product(*(range(d) for d in lead)):
        wl, ql, sl = logical(w[idx], transposed), logical(q[idx], transposed), scale[idx]
        for r0 in range(0, n, rows):
            qs, ss = quantize_rows(wl[r0:r0 + rows], fmt)
            ql[r0:r0 + rows].copy_(qs)
            sl[r0:r0 + rows].copy_(ss)
    return q, scale


def fsdp2_shards_integer_params() -> bool:
    """Whether this torch's FSDP2 can shard a frozen integer parameter: fully_shard in torch 2.11 made every sharded
    parameter require grad first, which an int8 tensor cannot (pytorch#177844; fp8 is a floating dtype and works).
    Read from FSDP2's own source; True when that cannot be read."""
    import inspect

    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

        return "requires_grad=param.requires_grad" in inspect.getsource(FSDPParam._init_sharded_param)
    except (ImportError, AttributeError, OSError, TypeError):
        return True
