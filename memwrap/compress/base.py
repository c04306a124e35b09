"""What every compressed weight shares: the input group (one P, one saved x̃), the lift, the merge into W.

A compressed weight W (n × m, or E experts of n × m) is frozen; its update arrives as subspace coordinates
(…, n, c, r) and reaches W through `merge`: W ← W·decay + lift(coords), with lift(coords) = reshape(coords @ Pᵀ).
`CompressedWeight` holds that bookkeeping once; `CompressedLinear` (memwrap.compress.linear) and `ExpertsUnit`
(memwrap.compress.experts) add only how their forward pass runs and where `weight` and `coords` live.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref

import torch

from ..errors import UnmergedUpdateError, UnsupportedArchitectureError
from . import quant
from .projection import draw_projection, projection_seed, subspace_transfer


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: autocast's when autocast is on for x's device, else x's."""
    dev = x.device.type
    if dev != "meta" and torch.is_autocast_enabled(dev) and x.is_floating_point():  # (meta: memwrap.simulate)
        return torch.get_autocast_dtype(dev)
    return x.dtype


def no_autocast(device: torch.device):
    """Autocast off on this device (a no-op on the meta device, which has no autocast: memwrap.simulate)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def coords_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of a compressed weight's coords (and so of their gradient): bf16 for a bf16 weight, as plain bf16
    training keeps its gradients; float32 otherwise (an fp16 gradient would need loss scaling to stay finite)."""
    return torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32


def is_released(p: torch.Tensor) -> bool:
    """Whether coords `p` hold no memory of their own: one zero broadcast to their shape (see `release`)."""
    return p.numel() > 1 and all(s == 0 for s in p.stride())


def release(p: torch.Tensor) -> bool:
    """Drop the storage of coords `p` (always zero between steps when memwrap's optimizer writes W itself): their
    value becomes one zero broadcast to their shape, so only their gradient takes memory. Only for a plain tensor with
    a storage of its own (not a DTensor, not a view into an engine's flat buffer); True when released."""
    if is_released(p) or getattr(p, "placements", None) is not None or p.storage_offset() != 0 \
            or p.untyped_storage().nbytes() != p.numel() * p.element_size() or bool(torch.count_nonzero(p)):
        return False
    p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
    return True


def materialize(p: torch.Tensor) -> None:
    """Give released coords a storage again (an optimizer that writes its update into them is about to step)."""
    if is_released(p):
        p.data = torch.zeros(p.shape, dtype=p.dtype, device=p.device)


class InputGroup:
    """Layers that read the same input tensor (q/k/v, gate/up): one P, one x̃ per forward.

    P is regenerated from (seed, crc32(group name), refresh index) and cached per (index, device, dtype). Caches
    are dropped when the group is pickled or copied (they hold weak references and device tensors).
    """

    def __init__(self, name: str, in_features: int, c: int, r: int, projection: str, seed: int):
        self.name, self.in_features, self.c, self.r = name, in_features, c, r
        self.d = in_features // c
        self.projection_kind, self.seed = projection, seed
        self.refresh_index = 0
        self._p_cache: dict[tuple, torch.Tensor] = {}
        self._x_cache: tuple | None = None  # (weakref x, x._version, dtype, refresh index, weakref x̃)
        self._slot: torch.Tensor | None = None  # P of the group's current index: one object, rewritten in place
        self._slot_index = -1
        self.members: list[CompressedWeight] = []  # the weights that read this group's P

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_p_cache"], state["_x_cache"], state["_slot"], state["_slot_index"] = {}, None, None, -1
        return state

    def live(self, index: int, device) -> torch.Tensor:
        """P of `index` (fp32, on `device`) for a compiled forward: at the group's current index one tensor object
        that a refresh rewrites in place, so torch.compile reads the new P without recompiling; a member behind
        the group (its own index older) gets a copy of its own."""
        device = torch.device(device)
        if index != self.refresh_index:
            return self.projection(index, device=device)
        slot = self._slot
        if slot is None or slot.device != device:
            self._slot = slot = self.projection(index, device=device).clone()
        elif self._slot_index != index:
            for m in self.members:  # still reading the slot at an older index: keep their P in a copy of their own
                if m.__dict__.get("_p_live") is slot and m.refresh_index != index:
                    m._p_live = self.projection(m.refresh_index, device=device)
            slot.copy_(self.projection(index, device=device))
        self._slot_index = index
        return slot

    def cached_projections(self):
        """Every P tensor this group holds (its cache and the compiled forward's slot): state, not activations."""
        yield from self._p_cache.values()
        if self._slot is not None:
            yield self._slot

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

    def compress(self, x: torch.Tensor, dtype: torch.dtype, index: int | None = None,
                 live: torch.Tensor | None = None) -> torch.Tensor:
        """x̃ = reshape(x, N, c, d) @ P_index, shape (N, c, r); reused while the same x is fed to a sibling.

        Under torch.compile, `live` (the weight's `_p_live`) is P and nothing on the host is looked up: siblings read
        the same P object, so the compiled graph computes their shared x̃ once (common-subexpression elimination)."""
        if live is not None and torch.compiler.is_compiling():
            with torch.no_grad():
                return (x.detach().to(dtype).reshape(-1, self.d) @ live.to(dtype)).reshape(-1, self.c, self.r)
        index = self.refresh_index if index is None else index
        cached = self._x_cache
        if cached is not None:
            xref, version, cdt, cindex, tref = cached
            x_tilde = tref()
            if xref() is x and version == x._version and cdt == dtype and cindex == index and x_tilde is not None:
                return x_tilde
        with torch.no_grad():
            p = self.projection(index, device=x.device, dtype=dtype)
            x2 = x.detach().to(dtype).reshape(-1, self.d)  # (N·c, d): every block of every token, one GEMM
            x_tilde = (x2 @ p).reshape(-1, self.c, self.r)  # (N, c, r)
        self._x_cache = (weakref.ref(x), x._version, dtype, index, weakref.ref(x_tilde))
        return x_tilde


class kept_dtype:
    """Around a module's `_apply` (model.to(dtype), .half(), .bfloat16(), .float()): the coords keep the dtype they had
    (float32 for a model wrapped in float32), their gradient too, while the dense weights take the new one; device
    moves pass through. Released coords (one broadcast zero) stay released. `exact` tensors (an 8-bit W, its float32
    scales) keep their dtype and values exactly: a cast is undone from the original."""

    def __init__(self, params, exact=()):
        self.params = [(p, p.dtype, is_released(p)) for p in params]
        self.exact = [(t, t.data) for t in exact]  # 8-bit W and its scales: never cast, only moved

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for t, data in self.exact:
            if t.dtype != data.dtype:
                t.data = data.to(device=t.device)
        self.exact = []
        for p, dtype, released in self.params:
            if p.dtype == dtype:
                continue
            if released or is_released(p):
                p.data = torch.zeros((), dtype=dtype, device=p.device).expand(p.shape)
            else:
                p.data = p.data.to(dtype)
            if p.grad is not None:
                p.grad = p.grad.to(dtype)


def lift(coords: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(…, n, c, r) coordinates -> (…, n, c·d) weight-shaped tensor: reshape(coords @ Pᵀ)."""
    *lead, n, c, r = coords.shape
    return (coords @ p.T.to(coords.dtype)).reshape(*lead, n, c * p.shape[0])


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """float32 -> bfloat16 rounding up or down with probability proportional to the distance (unbiased)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def stochastic_round_fp16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """float32 -> float16 rounding to one of the two neighbours with probability proportional to the distance
    (unbiased, subnormals included); values beyond float16's range become ±inf as with nearest rounding."""
    x = x.contiguous()
    near = x.to(torch.float16)
    toward = torch.where(near.float() > x, -torch.inf, torch.inf).to(torch.float16)
    other = torch.nextafter(near, toward)  # the neighbour on x's other side
    gap = other.float() - near.float()
    p_other = torch.where(gap != 0, (x - near.float()) / gap, torch.zeros_like(x)).nan_to_num_(0.0)
    u = torch.rand(x.shape, device=x.device, generator=generator)
    return torch.where(torch.isfinite(near) & (u < p_other), other, near)


STOCHASTIC_ROUNDING = {torch.bfloat16: stochastic_round_bf16, torch.float16: stochastic_round_fp16}
# the merge's transient (lift, fp32 copy, rounding noise) stays below this: large enough that each kernel of a wave of
# the grouped step (memwrap.compress.grouped) runs far longer than its launch takes on a GPU (~13M elements)
MERGE_CHUNK_BYTES = 256 << 20
MERGE_BYTES_PER_ELEMENT = 20  # what one weight element costs while it is merged (bf16 + stochastic rounding)


def merge_rows(rows: int, width: int) -> int:
    """Rows of a weight merged at once so the merge transient stays within MERGE_CHUNK_BYTES."""
    return max(1, min(rows, MERGE_CHUNK_BYTES // max(1, width * MERGE_BYTES_PER_ELEMENT)))


def rounding_generator(device: torch.device, seed: int, name: str, step: int) -> torch.Generator | None:
    """The stochastic-rounding stream of (seed, name, step) on `device`; None on the meta device (memwrap.simulate)."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(projection_seed(seed, name, step))


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, decay: float, *, stochastic: bool,
                  seed: int, name: str, step: int) -> None:
    """weight ← weight·decay + delta in place (decay = 1 − lr·wd), stochastically rounded for bf16 and fp16 weights."""
    w = local(weight)
    with torch.no_grad():
        if w.dtype in STOCHASTIC_ROUNDING and stochastic:
            g = rounding_generator(w.device, seed, name + "#round", step)
            exact = w.float() * decay + delta.float()
            w.copy_(STOCHASTIC_ROUNDING[w.dtype](exact, g))
        else:
            if decay != 1.0:
                w.mul_(decay)
            w.add_(delta.to(w.dtype))


class CompressedWeight:
    """The bookkeeping of one compressed weight; subclasses provide `weight`, `coords` and a forward pass.

    Attributes: `layer_name`, `in_features` m, `out_features` n, `c`, `r`, `group` (an InputGroup), `refresh_every`,
    `steps` (optimizer steps merged: memwrap's own refresh counter), `refresh_index` (which P the coordinates live
    under, steps // refresh_every), `transposed` (W stored (…, m, n)), `stochastic_rounding`.
    memwrap.compress.merge and memwrap.optim rely only on what this class defines.
    """

    DATA_WRITE_CHECKS = (2, 16)  # forwards at which coords are checked for writes autograd cannot see; then every 256

    weight: torch.Tensor
    coords: torch.Tensor

    def _init_compressed(self, name: str, in_features: int, out_features: int, c: int, r: int, group: InputGroup, *,
                         refresh_every: int, stochastic_rounding: bool, transposed: bool,
                         weight_requires_grad: bool) -> None:
        self.layer_name, self.in_features, self.out_features = name, in_features, out_features
        self.c, self.r, self.group = c, r, group
        self.refresh_every, self.stochastic_rounding = refresh_every, stochastic_rounding
        self.transposed = transposed
        self.refresh_index = 0
        self.steps = 0
        self._weight_requires_grad = weight_requires_grad  # restored on W by unwrap
        self._merged: tuple[int, int] | None = None  # (id, _version) of coords right after the last merge
        self._seen: tuple[int, int] | None = None  # (id, _version) of the coords the last forward checked
        self._claim: tuple[int, int, int] | None = None  # (id(optimizer), id(grad), grad._version) last merged
        self._forwards = 0
        self._base: torch.Tensor | None = None  # coords' value at the last merge of an external write (kept, not zeroed)
        self.is_head = False  # a causal LM's output head: always in use when training on labels
        self._engine_checked = False  # every ENGINE_CHECKS entry gave its final verdict (see check_engine)
        self._prechecked = False  # the model's pre-forward hook checked this forward already
        self.quant: quant.Format | None = None  # 8-bit W (memwrap.compress.quant): its format
        self._orig_dtype = None  # the dtype W had before it was stored in 8 bits (unwrap restores it)
        group.members.append(self)

    def _reset_after_copy(self) -> None:
        """A deepcopy or an unpickled copy: caches and the merge baseline belong to the original."""
        self._merged = self._seen = self._claim = None
        self._engine_checked = self._prechecked = False
        if "is_head" not in self.__dict__:  # pickled by memwrap 0.1.0
            self.is_head = False
        self.__dict__.setdefault("quant", None)
        self.__dict__.setdefault("_orig_dtype", None)

    # ---- 8-bit W (memwrap.compress.quant) ------------------------------------------------------------------------
    @property
    def scale(self) -> torch.Tensor | None:
        """The scales of an 8-bit W, (…, n, m / B) float32; None for a weight kept in its own dtype."""
        if self.quant is None:
            return None
        module, name = self._scale_owner()
        return getattr(module, name)

    def _scale_owner(self) -> tuple:
        """(module, attribute name) the scales are registered under (subclasses: next to their weight)."""
        raise NotImplementedError

    def quantized_tensors(self) -> list[torch.Tensor]:
        """An 8-bit W and its scales (kept as they are through model.to(dtype)); nothing for a weight kept as it was."""
        return [] if self.quant is None else [self.weight, self.scale]

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W in `dtype`, storage orientation: dequantized for an 8-bit W (one layer's transient), else a cast."""
        return quant.dense(self.weight, self.scale, dtype, self.transposed)

    def store_8bit(self, fmt: quant.Format) -> None:
        """Store W in 8 bits (same Parameter object, new data) with its scales registered as a frozen parameter (so
        state_dict, DDP's broadcast and FSDP2's sharding take them with W)."""
        w = self.weight
        with torch.no_grad():
            q, scale = quant.quantize(w.detach(), fmt, self.transposed, MERGE_CHUNK_BYTES)
        self._orig_dtype = w.dtype
        w.data = q
        module, name = self._scale_owner()
        module.register_parameter(name, torch.nn.Parameter(scale, requires_grad=False))
        self.quant = fmt

    def restore_dtype(self) -> None:
        """Back to a plain W in its original dtype (dequantized), the scales removed (unwrap)."""
        if self.quant is None:
            return
        with torch.no_grad():
            self.weight.data = self.dense_weight(self._orig_dtype).contiguous()
        module, name = self._scale_owner()
        delattr(module, name)
        self.quant = None

    @property
    def d(self) -> int:
        return self.in_features // self.c

    def lifted(self, coords: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """Weight-shaped (…, n, m) lift of subspace coordinates under P of `index` (default: current)."""
        c = local(coords)
        p = self.group.projection(self.refresh_index if index is None else index, device=c.device, dtype=torch.float32)
        return lift(c.float(), p)

    def apply_delta(self, delta: torch.Tensor, decay: float, step: int) -> None:
        """W ← W·decay + delta, delta weight-shaped in the logical (…, n, m) orientation."""
        if self.quant is not None:
            self._merge_8bit(lambda idx, rows: delta[idx + (rows,)].float(), delta.shape[:-2], delta.shape[-2], decay,
                             step)
            return
        add_to_weight(self.weight, delta.transpose(-1, -2) if self.transposed else delta, decay,
                      stochastic=self.stochastic_rounding, seed=self.group.seed, name=self.layer_name, step=step)

    def merge(self, delta_coords: torch.Tensor, decay: float, step: int) -> None:
        """W ← W·decay + lift(delta_coords), a block of output rows at a time (the transient stays bounded).

        Each block draws its own stochastic-rounding stream (seeded by layer, step and block), so the merge is
        deterministic for a seed and unbiased."""
        c = local(delta_coords)
        w = local(self.weight)
        lead, n = c.shape[:-3], c.shape[-3]
        if self.quant is not None:
            self._merge_8bit(lambda idx, rows: self.lifted(c[idx + (rows,)]), lead, n, decay, step)
            return
        step_rows = merge_rows(n, self.in_features)
        if step_rows >= n * math.prod(lead):  # one block: the whole weight (every expert of a fused one)
            self.apply_delta(self.lifted(delta_coords), decay, step)
            return
        for idx, rows in self._row_blocks(lead, n):
            delta = self.lifted(c[idx + (rows,)])  # (rows, m)
            target = w[idx + ((slice(None), rows) if self.transposed else (rows,))]
            add_to_weight(target, delta.transpose(-1, -2) if self.transposed else delta, decay,
                          stochastic=self.stochastic_rounding, seed=self.group.seed,
                          name=f"{self.layer_name}#{idx}.{rows.start}", step=step)

    def _row_blocks(self, lead: tuple, n: int):
        """(expert index, rows) of each block the merge writes: every expert of a fused weight, then its rows, at most
        `merge_rows` at a time (the transient stays bounded)."""
        step_rows = merge_rows(n, self.in_features)
        for idx in itertools.product(*(range(d) for d in lead)):
            for r0 in range(0, n, step_rows):
                yield idx, slice(r0, min(n, r0 + step_rows))

    def _merge_8bit(self, delta_of, lead: tuple, n: int, decay: float, step: int) -> None:
        """W ← Q(deq(W)·decay + delta) a block of rows at a time (delta_of(expert index, rows) -> float32 logical
        rows), stochastically rounded onto the 8-bit grid (memwrap.compress.quant.requantize)."""
        q, scale = local(self.weight), local(self.scale)
        if quant.logical(q, self.transposed).shape[:-1] != scale.shape[:-1]:
            raise UnsupportedArchitectureError(
                f"wrapped layer {self.layer_name!r}: its 8-bit weight and its scales are sharded differently (FSDP2 "
                "shards a transposed weight, GPT-2's Conv1D, by input columns, its scales by output rows), so its "
                "update cannot be merged. Wrap with weights='keep' for FSDP2, or train the 8-bit model with DDP.")
        with torch.no_grad():
            for idx, rows in self._row_blocks(lead, n):
                ql, sl = quant.logical(q[idx], self.transposed)[rows], scale[idx][rows]
                exact = quant.dequantize(ql, sl, False)
                exact.mul_(decay).add_(delta_of(idx, rows))
                g = rounding_generator(q.device, self.group.seed, f"{self.layer_name}#{idx}.{rows.start}#round", step)
                qn, sn = quant.requantize(exact, sl, self.quant, self.stochastic_rounding, g)
                ql.copy_(qn)
                sl.copy_(sn)

    def index_at(self, steps: int) -> int:
        """Which P (refresh index) the coordinates live under after `steps` completed optimizer steps."""
        return steps // self.refresh_every

    def advance(self, step: int) -> torch.Tensor | None:
        """Move to the refresh index of `step` completed steps; the r × r transfer of coordinates if P changed."""
        new_index = self.index_at(step)
        if new_index == self.refresh_index:
            return None
        t = self.group.transfer(self.refresh_index, new_index)
        self.refresh_index = new_index
        self.group.refresh_index = max(self.group.refresh_index, new_index)
        self.sync_live()
        return t

    def set_steps(self, steps: int) -> None:
        """Put the weight at `steps` completed optimizer steps (a restored checkpoint): counter and P."""
        self.steps = int(steps)
        self.refresh_index = self.index_at(self.steps)
        self.group.refresh_index = self.refresh_index
        self.sync_live()

    def sync_live(self) -> None:
        """Point `_p_live` (the P a compiled forward reads) at this weight's current P, on its weight's device."""
        w = self.weight
        if w.device.type != "meta":
            self._p_live = self.group.live(self.refresh_index, local(w).device)

    def compress_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x̃ of this weight's input under its current P (compiled: the P tensor kept current by the pre-hook)."""
        if torch.compiler.is_compiling():
            return self.group.compress(x, dtype, live=self.__dict__.get("_p_live"))
        return self.group.compress(x, dtype, self.refresh_index)

    def precheck(self) -> bool:
        """From the wrapped model's pre-forward hook, on the host, outside any compiled region: the checks of
        `check_pending` and the P a compiled forward reads; the layer's own forward then skips its check. True when
        this forward is one that checks the coords' values: the hook checks every such weight at once."""
        due = self._check(defer=True)
        self.sync_live()
        self._prechecked = True
        return due

    def claim(self, optimizer, grad: torch.Tensor) -> bool:
        """False when another optimizer already merged this very gradient (a wrapper and the optimizer it wraps)."""
        key = (id(optimizer), id(grad), grad._version)
        if self._claim is not None and self._claim[1:] == key[1:] and self._claim[0] != key[0]:
            return False
        self._claim = key
        return True

    def _pending(self, p: torch.Tensor) -> torch.Tensor:
        """What coords hold that W does not have yet: all of it, or what changed since an external write was merged."""
        return p.detach() if self._base is None else local(p.detach()) - self._base

    def check_engine(self) -> None:
        """At forwards until every ENGINE_CHECKS entry gives a final verdict (memwrap.integrations.deepspeed attaches to
        the DeepSpeed engine running this layer, or refuses a ZeRO layer it cannot reach) before anything steps."""
        verdicts = [check(self) for check in ENGINE_CHECKS]  # a refusal raises and leaves the layer unchecked
        self._engine_checked = all(verdicts)  # not final (DeepSpeed may take the model over later): asked again

    def check_pending(self) -> None:
        """Before a forward: merge coords written outside an optimizer step (seen by their version counter), and
        now and then check for writes autograd cannot see. Host-side compares; a device sync only when coords changed.
        Nothing here is traced by torch.compile: the model's pre-forward hook ran it already (`precheck`)."""
        if torch.compiler.is_compiling():
            return
        if self._prechecked:
            self._prechecked = False
            return
        self._check()

    @torch.no_grad()
    def _check(self, defer: bool = False) -> bool:
        if not self._engine_checked:
            self.check_engine()
        p = self.coords
        key = (id(p), p._version)
        if key != self._merged and key != self._seen:  # FSDP2 forwards see their unsharded copy: `_seen` is that one
            delta = self._pending(p)
            if torch.count_nonzero(local(delta)):  # written in place: a manual loop, a master copy written back
                self.steps += 1
                self.merge(delta, 1.0, self.steps)
                # coords keep their value (a master copy will write its running total again): remember it
                self._base = local(p.detach()).clone()
                self.advance(self.steps)
            self._merged = self._seen = key
            return False
        self._forwards += 1
        if not (self._forwards in self.DATA_WRITE_CHECKS or self._forwards % 256 == 0):
            return False
        if defer:
            return True
        self.raise_if_unmerged()
        return False

    def raise_if_unmerged(self) -> None:
        """UnmergedUpdateError when coords hold an update that no merge saw (one host read)."""
        if torch.count_nonzero(local(self._pending(self.coords))):
            raise UnmergedUpdateError(
                f"the coords of wrapped layer {self.layer_name!r} hold an update that nothing merged into its weight: "
                "they were written in a way autograd's version counter does not see (through `.data`, or a kernel that "
                "writes in place behind autograd's back). Write them with `with torch.no_grad(): p.add_(...)` / "
                "`p.copy_(...)`, or step them with a torch.optim optimizer; then memwrap merges every update.")

    def flush(self) -> None:
        """Merge whatever `coords` holds that W lacks (no decay): nothing pending is lost when the layer is removed."""
        with torch.no_grad():
            pending = self._pending(self.coords)
            if torch.count_nonzero(local(pending)):
                self.merge(pending, 1.0, 0)
            self._base = None


# callables(unit) -> True once their verdict is final, run at a layer's forwards until then (cheaply: each decides how
# much to look again); memwrap.integrations.deepspeed adds one
ENGINE_CHECKS: list = []


class PreForwardCheck:
    """The wrapped model's forward pre-hook: every compressed weight's host-side checks (`precheck`) before the
    model runs. torch.compile runs a compiled module's hooks outside its graph, and this one is never traced: its
    `__call__` is put under `torch.compiler.disable` when the first hook is made (decorating it at import would
    import torch._dynamo, two seconds, with memwrap), so a compiled forward holds no host bookkeeping at all."""

    def __init__(self, units: list[CompressedWeight]):
        self.units = units
        cls = type(self)
        if "__call__" not in cls.__dict__:
            cls.__call__ = torch.compiler.disable(cls._precheck)

    def _precheck(self, module, args) -> None:
        """The checks of every weight. At the forwards that check the coords' values (2, 16, then every 256) one
        device flag covers every weight; the next optimizer step reads it together with its non-finite flag (one host
        read: memwrap.compress.merge.nonfinite_check), or, when no step read it, the next forward does."""
        due = [unit for unit in self.units if unit.precheck()]
        with torch.no_grad():
            settle_unmerged_checks(self.units)
            flag = _all_zero([local(u._pending(u.coords)) for u in due])
            if flag is not None:
                for unit in due:
                    unit._unmerged_check = flag


def take_unmerged_checks(units) -> torch.Tensor | None:
    """The device flags of the coords-value checks not read yet (True: nothing unmerged), combined; they are consumed."""
    flags = {}
    for unit in units:
        flag = unit.__dict__.pop("_unmerged_check", None)
        if flag is not None:
            flags[id(flag)] = flag
    if not flags:
        return None
    flags = list(flags.values())
    return flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all()


def raise_unmerged(units) -> None:
    for unit in units:
        unit.raise_if_unmerged()


def settle_unmerged_checks(units) -> None:
    """Read the checks no optimizer step read (one host read) and raise UnmergedUpdateError if one failed."""
    flag = take_unmerged_checks(units)
    if flag is not None and not bool(flag):
        raise_unmerged(units)


def max_abs_flag(tensors: list[torch.Tensor], test) -> torch.Tensor:
    """One bool tensor: `test` holds for the max-abs of every (device, dtype) group of the tensors (one fused norm per
    group), combined on the first tensor's device. The non-finite flag and the coords check both read it."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    device = tensors[0].device
    flags = [test(torch.stack(torch._foreach_norm(ts, ord=math.inf))).all().to(device) for ts in groups.values()]
    return torch.stack(flags).all() if len(flags) > 1 else flags[0]


def _all_zero(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One bool tensor: every element of every tensor is zero; None when there is nothing to check (no tensors, or
    only empty ones: coords a ZeRO engine partitioned away)."""
    tensors = [t for t in tensors if t.numel()]
    return max_abs_flag(tensors, lambda norms: norms.eq(0)) if tensors else None
