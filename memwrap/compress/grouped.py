"""Grouped updates: the compressed weights of one shape lifted and merged together, in a number of kernels that does
not grow with the model's depth.

A model's compressed weights come in a handful of shapes (every q_proj and o_proj of a Llama, every k_proj and v_proj,
every gate/up, every down, the head, every fused expert tensor): a `Bucket` holds the weights of one shape. Their
subspace coordinates are stacked into one tensor, lifted with one batched matmul against the stacked projections
(each layer has its own P), and added into the weights with one stochastic rounding over the whole batch; the
weights get their new values back in one foreach copy. Per-layer work is Python bookkeeping only.

The transient stays bounded as `CompressedWeight.merge`'s does: a bucket is cut into pieces (a range of its weights
with all their rows, or one weight's block of rows when a single weight is larger than a wave allows), and pieces are
packed into waves of at most `wave_bytes` (MERGE_CHUNK_BYTES, or the plan's smaller `step_wave_bytes`; less on a CPU),
counting MERGE_BYTES_PER_ELEMENT per weight element. A small model is one wave; a 7B has many, each a large kernel,
so launches are never what limits it.

Stochastic rounding: one noise draw per wave, seeded by (the first weight's seed and name, the wave, the step), so a
run is deterministic for a seed and every weight element's rounding is unbiased. The bits of each float32 result are
added to 16 random bits and the bfloat16 keeps the high half, read in place (a little-endian view), as
`stochastic_round_bf16` does one tensor at a time.

Only plain tensors (or the local shards of DTensors whose rows are not sharded) on one device go through here; the
callers keep the per-weight path for the rest (`CompressedWeight.merge`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from . import quant
from .base import MERGE_BYTES_PER_ELEMENT, MERGE_CHUNK_BYTES, STOCHASTIC_ROUNDING, CompressedWeight, local, rounding_generator
from .projection import projection_seed

_LITTLE_ENDIAN = sys.byteorder == "little"
CPU_WAVE_BYTES = 16 << 20  # on a CPU, waves this small reuse the allocator's memory instead of faulting fresh pages in


def wave_bytes(bucket: Bucket) -> int:
    """The transient one wave may take: the plan's `step_wave_bytes` (the planner lowers it where the step would
    exceed the budget), else MERGE_CHUNK_BYTES; at most CPU_WAVE_BYTES on a CPU (where that measures faster)."""
    budget = getattr(bucket.units[0], "wave_bytes", None) or MERGE_CHUNK_BYTES
    return min(budget, CPU_WAVE_BYTES) if bucket.device.type == "cpu" else budget


def signature(unit: CompressedWeight) -> tuple:
    """What weights must share to be stacked: coordinate and weight shapes, orientation, dtypes, device, rounding."""
    c, w = local(unit.coords), local(unit.weight)
    return (tuple(c.shape), tuple(w.shape), unit.transposed, w.dtype, c.dtype, w.device, bool(unit.stochastic_rounding))


class Bucket:
    """Compressed weights of one signature, in a fixed order (the stacking order of every tensor built for them)."""

    def __init__(self, units: list[CompressedWeight]):
        self.units = units
        u0 = units[0]
        c = local(u0.coords)
        self.lead, self.n, self.c, self.r = tuple(c.shape[:-3]), c.shape[-3], c.shape[-2], c.shape[-1]
        self.m, self.d = u0.in_features, u0.in_features // c.shape[-2]
        self.transposed = u0.transposed
        w = local(u0.weight)
        self.wdtype, self.device = w.dtype, w.device
        self.quant = u0.quant  # an 8-bit W: its format (memwrap.compress.quant)
        self.stochastic = bool(u0.stochastic_rounding) and (w.dtype in STOCHASTIC_ROUNDING or self.quant is not None)
        self.experts = math.prod(self.lead)
        self._pt: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.units)

    def projections_t(self) -> torch.Tensor:
        """Pᵀ of every weight, stacked: (K, r, d) float32 on the bucket's device (made once per bucket, and a bucket
        lives for one step: nothing is kept between steps besides each group's own P)."""
        if self._pt is None:
            self._pt = torch.stack([u.group.projection(u.refresh_index, device=self.device).T for u in self.units])
        return self._pt


def buckets_of(units: list[CompressedWeight]) -> list[Bucket]:
    groups: dict[tuple, list] = {}
    for u in units:
        groups.setdefault(signature(u), []).append(u)
    return [Bucket(us) for us in groups.values()]


@dataclass(frozen=True)
class Piece:
    """Weights k0..k1 of a bucket, rows r0..r1 of each (all rows unless one weight is split)."""

    bucket: Bucket
    k0: int
    k1: int
    r0: int
    r1: int

    @property
    def shape(self) -> tuple:
        """(weights, *experts, rows, m): the logical orientation of the piece's weight-shaped tensors."""
        return (self.k1 - self.k0, *self.bucket.lead, self.r1 - self.r0, self.bucket.m)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def units(self) -> list[CompressedWeight]:
        return self.bucket.units[self.k0:self.k1]

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """Rows r0..r1 of a coordinate-shaped (…, n, c, r) or row-shaped (…, n) tensor of one weight."""
        if t.ndim == len(self.bucket.lead) + 1:
            return t[..., self.r0:self.r1]
        return t[..., self.r0:self.r1, :, :]

    def rounding_name(self) -> str:
        """Names the stochastic-rounding stream of a wave this piece starts (with the seed and the step)."""
        return f"{self.bucket.units[self.k0].layer_name}#wave{self.r0}"

    def rounding_generator(self, step: int) -> torch.Generator | None:
        return rounding_generator(self.bucket.device, self.bucket.units[self.k0].group.seed, self.rounding_name(), step)

    def weights(self) -> list[torch.Tensor]:
        """Each weight's slice, in its storage orientation."""
        rows = slice(self.r0, self.r1)
        return [local(u.weight)[..., :, rows] if self.bucket.transposed else local(u.weight)[..., rows, :]
                for u in self.units]

    def scales(self) -> list[torch.Tensor]:
        """Each 8-bit weight's scales for the piece's rows (logical orientation: (*experts, rows, m / B))."""
        return [local(u.scale)[..., self.r0:self.r1, :] for u in self.units]

    def stacked(self, sources: list[torch.Tensor]) -> torch.Tensor:
        """The piece's rows of coordinate-shaped tensors (one per weight of the bucket), stacked in float32:
        (weights, *experts, rows, c, r). Stacked in their own dtype, then cast: a GPU concatenates same-dtype inputs in
        one kernel (into another dtype it copies them one by one)."""
        x = torch.stack([self.rows_of(local(s)) for s in sources[self.k0:self.k1]])
        return x if x.dtype == torch.float32 else x.float()

    def lift(self, sources: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """out (the piece's shape, float32) ← the lift of the sources' rows: one stack, one batched matmul."""
        return self.lift_stacked(self.stacked(sources), out)

    def lift_stacked(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out ← the lift of `stacked` coordinates x: one batched matmul against the weights' stacked Pᵀ."""
        b = self.bucket
        kc = self.k1 - self.k0
        torch.bmm(x.view(kc, -1, b.r), b.projections_t()[self.k0:self.k1], out=out.view(kc, -1, b.d))
        return out


def pieces_of(bucket: Bucket, per_element: int = MERGE_BYTES_PER_ELEMENT) -> list[Piece]:
    budget = wave_bytes(bucket)
    one = bucket.experts * bucket.n * bucket.m * per_element  # bytes of one whole weight while it is merged
    if one <= budget:
        kc = max(1, budget // one)
        return [Piece(bucket, k0, min(len(bucket), k0 + kc), 0, bucket.n) for k0 in range(0, len(bucket), kc)]
    rows = max(1, budget // (bucket.experts * bucket.m * per_element))
    return [Piece(bucket, k, k + 1, r0, min(bucket.n, r0 + rows)) for k in range(len(bucket))
            for r0 in range(0, bucket.n, rows)]


def waves_of(buckets: list[Bucket], per_element: int = MERGE_BYTES_PER_ELEMENT) -> list[list[Piece]]:
    """Pieces packed greedily into waves of at most `wave_bytes` (a piece larger than that is a wave alone)."""
    waves: list[list[Piece]] = []
    size = 0
    for bucket in sorted(buckets, key=lambda b: b.quant is not None):  # 8-bit weights in waves of their own
        budget = wave_bytes(bucket)
        for piece in pieces_of(bucket, per_element):
            nbytes = piece.numel * per_element
            if not waves or size + nbytes > budget or (waves[-1][0].bucket.quant is None) != (bucket.quant is None):
                waves.append([])
                size = 0
            waves[-1].append(piece)
            size += nbytes
    return waves


def consecutive(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Views of a flat tensor laid out one shape after another."""
    out, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[offset:offset + size].view(shape))
        offset += size
    return out


def views(flat: torch.Tensor, pieces: list[Piece]) -> list[torch.Tensor]:
    """Each piece's view of a flat buffer laid out piece after piece."""
    return consecutive(flat, [piece.shape for piece in pieces])


def wave_buffer(pieces: list[Piece]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One float32 buffer for a wave's weight-shaped values, and each piece's view of it."""
    flat = torch.empty(sum(p.numel for p in pieces), dtype=torch.float32, device=pieces[0].bucket.device)
    return flat, views(flat, pieces)


def write(pieces: list[Piece], flat: torch.Tensor, ys: list[torch.Tensor], decay: float, step: int,
          fused: bool = False) -> None:
    """W ← round(W·decay + y) for every piece of a wave; `ys` are the pieces' views of `flat` (float32, logical
    orientation) holding the deltas, overwritten with the exact sums. Rounding: stochastic for bf16 weights (one draw
    for the wave), fp16 weights (one tensor at a time), nearest otherwise; float32 weights are updated in place.
    fused: bf16 weights with stochastic rounding through `write_fused` (one compiled kernel). 8-bit weights (waves of
    their own): `write_8bit`."""
    if pieces[0].bucket.quant is not None:
        write_8bit(pieces, ys, decay, step)
        return
    if fused and flat.device.type != "meta" and write_fused(pieces, flat, ys, decay, step):
        return
    if all(p.bucket.wdtype == torch.float32 for p in pieces):  # no rounding: in place, nothing stacked
        targets = [w for piece in pieces for w in piece.weights()]
        if decay != 1.0:
            torch._foreach_mul_(targets, decay)
        torch._foreach_add_(targets, [v for piece, y in zip(pieces, ys, strict=True)
                                      for v in (y.transpose(-1, -2) if piece.bucket.transposed else y).unbind(0)])
        return
    targets, values = [], []
    for piece, y in zip(pieces, ys, strict=True):
        yw = y.transpose(-1, -2) if piece.bucket.transposed else y  # the storage orientation
        ws = piece.weights()
        stacked = torch.stack(ws)
        if decay != 1.0:
            yw.add_(stacked, alpha=decay)
        else:
            yw.add_(stacked)
        targets.extend(ws)
        values.append(yw)
    if _LITTLE_ENDIAN and all(p.bucket.stochastic and p.bucket.wdtype == torch.bfloat16 for p in pieces):
        g = pieces[0].rounding_generator(step)
        bits = flat.view(torch.int32)
        bits.add_(torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=flat.device, generator=g))
        # the rounded bfloat16 values are the high halves, made dense (one kernel) so that the copy into the weights
        # is one multi-tensor kernel on a GPU (a strided source would be copied tensor by tensor)
        high = flat.view(torch.int16)[1::2].view(torch.bfloat16).contiguous()
        rounded = views(high, pieces)
        values = [r.transpose(-1, -2) if p.bucket.transposed else r for p, r in zip(pieces, rounded, strict=True)]
    elif any(p.bucket.stochastic for p in pieces):  # fp16, mixed dtypes, a big-endian host: one piece at a time
        for i, piece in enumerate(pieces):
            if piece.bucket.stochastic:
                values[i] = STOCHASTIC_ROUNDING[piece.bucket.wdtype](values[i], piece.rounding_generator(step))
    torch._foreach_copy_(targets, [v for value in values for v in value.unbind(0)])


def write_8bit(pieces: list[Piece], ys: list[torch.Tensor], decay: float, step: int) -> None:
    """W ← Q(deq(W)·decay + y) for a wave of 8-bit weights: per piece one stack of the 8-bit values and scales, one
    dequantization, one requantization (new scales where a block outgrew its own; stochastic rounding drawn from the
    wave's stream) and one foreach copy of values and scales back."""
    g = pieces[0].rounding_generator(step)
    for piece, y in zip(pieces, ys, strict=True):
        b = piece.bucket
        qs, ss = piece.weights(), piece.scales()
        scale = torch.stack(ss)
        y.add_(quant.dequantize(torch.stack(qs), scale, b.transposed), alpha=decay)
        qn, sn = quant.requantize(y, scale, b.quant, b.stochastic, g)
        torch._foreach_copy_(qs, list(quant.logical(qn, b.transposed).unbind(0)))
        torch._foreach_copy_(ss, list(sn.unbind(0)))


# ---- the fused write (opt-in: memwrap.optimizer(model, compile_step=True)) -------------------------------------------
# W ← round_sr(y + decay · W) as one elementwise chain that torch.compile fuses into one kernel (reads y and W, writes
# the rounded weights: 8 bytes per element instead of the eager chain's ~30). Its rounding noise is a counter-based
# hash of (seed, element index) — no generator, nothing to fall out of step between compiled and eager runs.
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 x < 2³², without int64 overflow (c split into 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def hash_noise(n: int, seed: torch.Tensor, device) -> torch.Tensor:
    """16 uniform random bits per element (int32 in [0, 65536)): lowbias32 (C. Wellons) of (index + seed) mod 2³²."""
    x = (torch.arange(n, device=device, dtype=torch.int64) + seed) & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return (x >> 8 & 0xFFFF).to(torch.int32)


def fused_round(y: torch.Tensor, w: torch.Tensor, decay: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """bfloat16 of y + decay · w (flat, float32 y, bfloat16 w), rounded stochastically with `hash_noise`."""
    exact = y + w.float() * decay
    bits = (exact.view(torch.int32) + hash_noise(y.numel(), seed, y.device)) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


_COMPILED: dict = {}


def _fused(y, w, decay, seed) -> torch.Tensor:
    """`fused_round` compiled once (dynamic shapes); eager if torch.compile cannot take it here (warned once)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:  # under a dispatch mode (memwrap's op counter) torch.compile refuses
        return fused_round(y, w, decay, seed)
    fn = _COMPILED.get("fn")
    if fn is None:
        fn = _COMPILED["fn"] = torch.compile(fused_round, dynamic=True, fullgraph=True)
    if fn is not fused_round:
        try:
            return fn(y, w, decay, seed)
        except Exception as e:  # noqa: BLE001 - a backend that cannot compile here: the same math, eagerly
            import warnings

            warnings.warn(f"memwrap: the compiled weight update failed ({type(e).__name__}: {str(e)[:200]}); "
                          "continuing with the same update uncompiled.", RuntimeWarning, stacklevel=3)
            _COMPILED["fn"] = fused_round
    return fused_round(y, w, decay, seed)


def write_fused(pieces: list[Piece], flat: torch.Tensor, ys: list[torch.Tensor], decay: float, step: int) -> bool:
    """`write` as one compiled kernel for a wave of bf16 weights with stochastic rounding; False (nothing written)
    where it does not apply (other dtypes, nearest rounding): the caller writes the eager way."""
    if not all(p.bucket.stochastic and p.bucket.wdtype == torch.bfloat16 for p in pieces):
        return False
    wflat = torch.empty(flat.numel(), dtype=torch.bfloat16, device=flat.device)
    targets = []
    for piece, wv in zip(pieces, views(wflat, pieces), strict=True):
        ws = piece.weights()
        torch.stack([w.transpose(-1, -2) for w in ws] if piece.bucket.transposed else ws, out=wv)  # logical order
        targets.extend(ws)
    seed = projection_seed(pieces[0].units[0].group.seed, pieces[0].rounding_name(), step) & _MASK32
    new = _fused(flat, wflat, torch.tensor(decay, dtype=torch.float32, device=flat.device),
                 torch.tensor(seed, dtype=torch.int64, device=flat.device))
    values = [v.transpose(-1, -2) if p.bucket.transposed else v for p, v in zip(pieces, views(new, pieces), strict=True)]
    torch._foreach_copy_(targets, [x for v in values for x in v.unbind(0)])
    return True


def merge_many(units: list[CompressedWeight], deltas: list[torch.Tensor], decay: float, step: int) -> None:
    """W ← W·decay + lift(delta) for every unit (deltas coordinate-shaped, (…, n, c, r)), grouped by shape."""
    by_id = {id(u): d for u, d in zip(units, deltas, strict=True)}
    buckets = buckets_of(units)
    for wave in waves_of(buckets):
        flat, ys = wave_buffer(wave)
        for piece, y in zip(wave, ys, strict=True):
            piece.lift([by_id[id(u)] for u in piece.bucket.units], y)
        write(wave, flat, ys, decay, step)
