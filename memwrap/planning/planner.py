"""Choosing, from a memory budget, (c, r) per layer and what each block recomputes; `wrap` applies all of it.

Gradient quality is the estimator's relative variance (d − r)/r per block (Stiefel P). At a fixed
compression c·r/m it equals m/(c·r) − 1 whatever the split, so the planner walks compression levels from
the least (c·r = m/2) to the finest and, within a level, splits c·r into blocks of rank r ≈ 8 (VLoRP: finer
granularity at equal c·r trained better). Every layer of one input width gets the same (c, r), so siblings
(q/k/v, gate/up) always share one x̃.

Quality first, then speed. At each level, every recompute choice is tried (MLP and attention kept or recomputed,
the chunked loss for causal LMs, and the fewest whole layers checkpointed that make it fit, by bisection); the
level is taken when any fits, and among those that fit the one with the least recomputed FLOPs wins
(`recompute_overhead`). So no layer is compressed finer than 1/8 while checkpointing every layer still fits at
1/8; finer levels come with a note of their expected quality cost. A smaller budget never yields more bytes.

Defaults when not given: batch_size 8, seq_len min(2048, the model's max_position_embeddings). The plan never
asks the user to do anything: `wrap` installs every measure it names (memwrap.compress.blocks and .loss).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..adapters import resolve
from ..compress import inject
from ..compress.projection import estimator_relative_variance
from ..config import ATTENTION_8BIT, LayerPlan, Plan, WrapConfig, _fmt_bytes
from ..errors import BudgetTooSmallError, InvalidSettingsError
from .estimate import (
    BUNDLED,
    Estimate,
    ModelShape,
    Weight,
    ZeroSpec,
    dtype_from_name,
    enumerate_weights,
    estimate,
    load_config,
    meta_model,
)

LEVELS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128)  # c·r / m, finest first
PREFERRED_RANK = 8
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEQ_LEN = 2048
PLAN_OPTIMIZER = "adamw"  # the plan assumes AdamW moments on coords (memwrap.optimizer's ProjFactor needs less)


@functools.lru_cache(maxsize=4096)
def settings_at(m: int, fraction: float) -> tuple[int, int]:
    """(c, r) with c | m, r ≤ m/c and c·r as close to fraction·m as possible from below, r near PREFERRED_RANK."""
    target = max(1, int(m * fraction))
    best, best_key = (1, 1), None
    for c in range(1, m + 1):
        if m % c or c > target:
            continue
        r = min(target // c, m // c)
        if r < 1:
            continue
        key = (c * r, -abs(math.log2(r / PREFERRED_RANK)), c)
        if best_key is None or key > best_key:
            best, best_key = (c, r), key
    return best


def relative_variance(layers: tuple[LayerPlan, ...]) -> float:
    """Mean estimator relative variance (d − r)/r over the compressed weights (0 for none)."""
    if not layers:
        return 0.0
    return sum(estimator_relative_variance(lp.d, lp.r) for lp in layers) / len(layers)


@dataclass(frozen=True)
class Target:
    """A compressible weight, as the planner needs it (from an inject.Candidate or from a meta model)."""

    name: str
    kind: str
    in_features: int
    out_features: int
    num_experts: int
    group: str


def layers_at(targets: list[Target], fraction: float, dtype_bytes: int) -> tuple[LayerPlan, ...]:
    cache: dict[int, tuple[int, int]] = {}
    out = []
    for t in targets:
        c, r = cache.setdefault(t.in_features, settings_at(t.in_features, fraction))
        out.append(LayerPlan(name=t.name, kind=t.kind, in_features=t.in_features, out_features=t.out_features,
                             c=c, r=r, num_experts=t.num_experts, group=t.group, dtype_bytes=dtype_bytes))
    return tuple(out)


QUALITY_FLOOR = 1 / 8  # finer only when even checkpointing every layer does not fit at this compression
HARD_FLOOR = 1 / 32  # finer only when nothing else fits; the notes then state the expected quality cost
LOSS_CHUNK_TOKENS = 1024  # most rows of the chunked cross-entropy the planner applies to causal LMs
LOSS_CHUNK_BYTES = 256 << 20  # ... and fewer where a chunk's logits (fp32, softmax, gradient) would pass this
QUALITY_FILE = os.path.join(os.path.dirname(__file__), "quality.json")  # written by tools/quality.py --publish


@functools.cache
def quality_curve() -> dict:
    """The measured quality curve (memwrap/planning/quality.json): held-out loss ratio to a tuned AdamW per
    compression and horizon, for the default optimizer settings; docs/quality.md shows the same numbers."""
    import json

    with open(QUALITY_FILE, encoding="utf-8") as f:
        return json.load(f)


def quality_cost(level: float) -> tuple[float, bool]:
    """(expected held-out loss above a tuned AdamW's, as a fraction; whether it is extrapolated) at compression
    `level`: the worst measured horizon; a level between two measured ones takes the finer one's cost (pessimistic);
    past the finest measured level the cost doubles per halving (extrapolated)."""
    measured: dict[float, float] = {}
    for ratios in quality_curve()["heldout_loss_ratio"].values():
        for key, (mean, _spread) in ratios.items():
            lv = 1 / int(key.split("/")[1])
            measured[lv] = max(measured.get(lv, 0.0), max(0.0, mean - 1))
    at_or_finer = [lv for lv in measured if lv <= level * 1.0001]
    if at_or_finer:
        return measured[max(at_or_finer)], False
    finest = min(measured)
    halvings = math.log2(finest / level)
    return max(measured[finest], 0.01) * 2 ** halvings, True
RECOMPUTE_CHOICES = (  # in no order: the planner takes, per compression, the fastest that fits
    {"mlp": "act", "attention": "keep"},
    {"mlp": "recompute", "attention": "keep"},
    {"mlp": "act", "attention": "recompute"},
    {"mlp": "recompute", "attention": "recompute"},
)


def step_flops(shape: ModelShape, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of each region: attention (projections and scores), MLP, one layer, the head."""
    s = shape
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    scores = 4 * seq_len * q / 2  # causal scores and their weighted sum
    attention = 2 * s.hidden * (2 * q + 2 * kv) + scores  # q, k, v, o projections; the scores
    dense_mlp = 6 * s.hidden * s.intermediate
    moe_mlp = 6 * s.hidden * s.moe_intermediate * max(s.top_k, 1) + 2 * s.hidden * s.num_experts \
        + 6 * s.hidden * s.shared_intermediate
    moe = s.moe_layers
    mlp = ((s.layers - moe) * dense_mlp + moe * moe_mlp) / max(s.layers, 1)
    return {"attention": attention, "mlp": mlp, "layer": attention + mlp, "head": 2 * s.hidden * s.vocab,
            "scores": scores}


def recompute_overhead(shape: ModelShape, savings: dict, seq_len: int) -> float:
    """Predicted step time over plain training (fraction): the FLOPs recomputed in backward over forward + backward
    (3 × forward). Element-wise recomputation (norms, act(gate)·up) is counted as free."""
    f = step_flops(shape, seq_len)
    which = savings.get("checkpoint_layers") or ()
    k = shape.layers if which == "all" else len(which)
    attention = {"recompute": f["attention"], **dict.fromkeys(ATTENTION_8BIT, f["scores"])}.get(
        savings.get("attention"), 0)
    extra = k * f["layer"] + (shape.layers - k) * ((f["mlp"] if savings.get("mlp") == "recompute" else 0) + attention)
    if savings.get("loss_chunk"):
        extra += f["head"]
    return extra / (3 * (shape.layers * f["layer"] + f["head"]))


@dataclass(frozen=True)
class Choice:
    layers: tuple[LayerPlan, ...]
    level: float
    savings: dict  # norms, mlp, attention, checkpoint_layers, loss_chunk: what wrap applies
    estimate: Estimate
    overhead: float  # predicted step time over plain training
    optimizer: str = PLAN_OPTIMIZER  # whose state bytes the plan counted: "adamw" (subspace) or "projfactor"
    weights: str = "keep"  # the compressed weights' storage: "keep", "int8", "fp8"
    head: bool = False  # the output head compressed because the exact one did not fit at this level
    moved: tuple = ()  # (groups at the coarser level, all groups, that level): per-layer rank and granularity
    weights_note: str = ""  # why weights="auto" chose what it chose

    @property
    def gradient_checkpointing(self) -> bool:
        return self.savings.get("checkpoint_layers") == "all"

    @property
    def chunked_cross_entropy(self) -> bool:
        return bool(self.savings.get("loss_chunk"))


def _estimate(shape, weights, layers, batch, seq, dtype_bytes, param_bytes, savings, optimizer=PLAN_OPTIMIZER,
              coords_bytes=4, zero=None, weight_format="keep"):
    return estimate(shape, weights, layers, batch_size=batch, seq_len=seq, dtype_bytes=dtype_bytes,
                    param_bytes=param_bytes, optimizer=optimizer, savings=savings, coords_bytes=coords_bytes, zero=zero,
                    weight_format=weight_format)


def _with_layers(savings: dict, k: int, n_layers: int) -> dict:
    """`savings` with the first k layers checkpointed (every layer: the MLP and attention choices no longer apply)."""
    if k >= n_layers:
        return dict(savings, checkpoint_layers="all", mlp="act", attention="keep")
    return dict(savings, checkpoint_layers=tuple(range(k)))


def loss_chunk_rows(shape: ModelShape, dtype_bytes: int) -> int:
    """Rows per chunk of the loss: LOSS_CHUNK_TOKENS, or a power of two below it that keeps a chunk's logits, their
    softmax and gradient within LOSS_CHUNK_BYTES (at least 16)."""
    per_row = shape.vocab * (8 + dtype_bytes)
    rows = LOSS_CHUNK_TOKENS
    while rows > 16 and rows * per_row > LOSS_CHUNK_BYTES:
        rows //= 2
    return rows


def best_at(shape, weights, layers, *, budget_bytes, batch, seq, dtype_bytes, param_bytes, fixed=None,
            optimizer=PLAN_OPTIMIZER, coords_bytes=4, zero=None, weight_format="keep") -> Choice | None:
    """At one compression: the fastest recompute choice that fits (fewest checkpointed layers, by bisection)."""
    causal = shape.family == "decoder"
    chunk_rows = loss_chunk_rows(shape, dtype_bytes)
    if fixed is not None:
        bases = [dict(fixed)]
    else:
        bases = [dict(norms="recompute", checkpoint_layers=(), loss_chunk=chunk, **rc)
                 for rc in RECOMPUTE_CHOICES for chunk in ((0, chunk_rows) if causal else (0,))]
    L = shape.layers
    best = None
    for base in bases:
        def peak(k, base=base):
            return _estimate(shape, weights, layers, batch, seq, dtype_bytes, param_bytes,
                             _with_layers(base, k, L), optimizer, coords_bytes, zero, weight_format).peak_bytes

        if fixed is not None:
            ks = [0]
        elif peak(L) > budget_bytes:
            continue
        else:
            lo, hi = 0, L  # the fewest checkpointed layers that fit
            while lo < hi:
                mid = (lo + hi) // 2
                if peak(mid) <= budget_bytes:
                    hi = mid
                else:
                    lo = mid + 1
            ks = [lo]
        for k in ks:
            savings = base if fixed is not None else _with_layers(base, k, L)
            est = _estimate(shape, weights, layers, batch, seq, dtype_bytes, param_bytes, savings, optimizer,
                            coords_bytes, zero, weight_format)
            if est.peak_bytes > budget_bytes:
                continue
            choice = Choice(layers, 0.0, savings, est, recompute_overhead(shape, savings, seq), optimizer, weight_format)
            key = (round(choice.overhead, 6), est.peak_bytes)  # equal time (to rounding): the fewer bytes
            if best is None or key < (round(best.overhead, 6), best.estimate.peak_bytes):
                best = choice
    return best


def sibling_groups(layers: tuple[LayerPlan, ...]) -> list[str]:
    """The groups of layers that must share (c, r) (siblings share one x̃), smallest in weight bytes first."""
    size: dict[str, int] = {}
    for lp in layers:
        key = lp.group or lp.name
        size[key] = size.get(key, 0) + lp.weight_numel
    return sorted(size, key=lambda k: size[k])  # stable: model order among equal sizes


def refine(shape, weights, choice: Choice, index: int, *, budget_bytes, batch, seq, dtype_bytes, param_bytes,
           fixed=None, coords_bytes=4, zero=None) -> Choice:
    """Rank and granularity per layer: from the level the plan fits at, move whole sibling groups to the next coarser
    level (smallest groups first, so the most layers gain) while some recompute choice still fits — the budget
    between two levels buys quality, not idle bytes. The largest number of groups that fits is found by bisection
    (each group moved adds bytes); among plans with that many, the fastest recompute choice wins as before."""
    if index == 0:
        return choice
    coarser = LEVELS[index - 1]
    groups = sibling_groups(choice.layers)
    cache: dict[int, tuple[int, int]] = {}

    def layers_with(k: int) -> tuple[LayerPlan, ...]:
        moved = set(groups[:k])
        out = []
        for lp in choice.layers:
            if (lp.group or lp.name) in moved:
                c, r = cache.setdefault(lp.in_features, settings_at(lp.in_features, coarser))
                lp = replace(lp, c=c, r=r)
            out.append(lp)
        return tuple(out)

    def attempt(k: int) -> Choice | None:
        return best_at(shape, weights, layers_with(k), budget_bytes=budget_bytes, batch=batch, seq=seq,
                       dtype_bytes=dtype_bytes, param_bytes=param_bytes, fixed=fixed, optimizer=choice.optimizer,
                       coords_bytes=coords_bytes, zero=zero, weight_format=choice.weights)

    lo, hi, best = 0, len(groups), None  # lo fits (k = 0 is the choice itself)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        got = attempt(mid)
        if got is not None:
            lo, best = mid, got
        else:
            hi = mid - 1
    if best is None:
        return choice
    if lo == len(groups):  # every group moved (the coarser level fits with this optimizer and head): one level again
        return replace(best, level=coarser, head=choice.head)
    return replace(best, level=choice.level, head=choice.head, moved=(lo, len(groups), coarser))


def choose(shape: ModelShape, weights: list[Weight], targets: list[Target], *, budget_bytes: int, batch_size: int,
           seq_len: int, dtype_bytes: int, param_bytes: int, fixed: dict | None = None, coords_bytes: int = 4,
           head: Target | None = None, zero: ZeroSpec | None = None, weight_format: str = "keep") -> Choice:
    """Quality first, then speed: the least compression at which some recompute choice fits, and at it the fastest
    choice; BudgetTooSmallError naming the smallest budget and the largest batch that fit.

    head: the output head, compressed (at the level of the plan) only where that keeps the plan from a finer level.
    zero: bytes per rank under DeepSpeed ZeRO, whose own AdamW steps the coords (memwrap's ProjFactor cannot run there).
    """
    for level in LEVELS:
        # ProjFactor (fewer state bytes, ~1% loss: docs/quality.md) only where it keeps the plan from going finer than a floor
        optimizers = (PLAN_OPTIMIZER, "projfactor") if level in (QUALITY_FLOOR, HARD_FLOOR) and zero is None \
            else (PLAN_OPTIMIZER,)
        for optimizer in optimizers:
            for with_head in (False, True) if head is not None else (False,):
                layers = layers_at(targets + ([head] if with_head else []), level, dtype_bytes)
                got = best_at(shape, weights, layers, budget_bytes=budget_bytes, batch=batch_size, seq=seq_len,
                              dtype_bytes=dtype_bytes, param_bytes=param_bytes, fixed=fixed, optimizer=optimizer,
                              coords_bytes=coords_bytes, zero=zero, weight_format=weight_format)
                if got is not None:
                    got = replace(got, level=level, head=with_head)
                    got = refine(shape, weights, got, LEVELS.index(level), budget_bytes=budget_bytes,
                                 batch=batch_size, seq=seq_len, dtype_bytes=dtype_bytes, param_bytes=param_bytes,
                                 fixed=fixed, coords_bytes=coords_bytes, zero=zero)
                    return got
    cheapest_layers = layers_at(targets + ([head] if head is not None else []), LEVELS[-1], dtype_bytes)
    chunk_rows = loss_chunk_rows(shape, dtype_bytes) if shape.family == "decoder" else 0
    cheapest = fixed if fixed is not None else dict(norms="recompute", mlp="act", attention="keep",
                                                      checkpoint_layers="all", loss_chunk=chunk_rows)

    def need(b: int) -> int:
        return _estimate(shape, weights, cheapest_layers, b, seq_len, dtype_bytes, param_bytes, cheapest,
                         coords_bytes=coords_bytes, zero=zero, weight_format=weight_format).peak_bytes

    least = need(batch_size)
    max_batch = 0
    lo, hi = 1, batch_size - 1
    while lo <= hi:  # the peak grows with the batch: bisect
        mid = (lo + hi) // 2
        if need(mid) <= budget_bytes:
            max_batch, lo = mid, mid + 1
        else:
            hi = mid - 1
    where = (f"fits at batch {max_batch}" if max_batch else
             f"does not fit even at batch 1 with seq_len {seq_len}; use a shorter sequence or a larger device")
    if zero is not None:
        where += f" ({zero.describe()}, per rank)"
    raise BudgetTooSmallError(
        f"nothing fits a budget of {_fmt_bytes(budget_bytes)}: needs at least {_fmt_bytes(least)} at batch "
        f"{batch_size} × seq_len {seq_len} (with the smallest rank, every layer checkpointed and the chunked "
        f"loss); {where}.", min_budget_bytes=int(least), max_batch_size=max_batch)


EIGHT_BIT_AUTO = "int8"  # the 8-bit format weights="auto" picks (docs/quality.md: int8 measured closer to bf16 than fp8)


def eight_bit_cost(fmt: str = EIGHT_BIT_AUTO) -> float:
    """The measured held-out loss cost of 8-bit weights over bf16 weights at equal compression (a fraction;
    memwrap/planning/quality.json, written from tools/compare.py runs: docs/quality.md)."""
    mean, _spread, _seeds = quality_curve()["weights_8bit"][fmt]
    return max(0.0, mean - 1)


def choose_weights(shape: ModelShape, weights: list[Weight], targets: list[Target], *, weight_option: str,
                   **kw) -> Choice:
    """`choose` for a weights= option: "keep", "int8" or "fp8" as given; "auto" keeps the weights' dtype where that
    fits at the quality threshold (QUALITY_FLOOR), else takes whichever of (kept weights at a finer compression, 8-bit
    weights at a coarser one) has the lower expected quality cost: the compression's measured cost against the
    compression's plus 8-bit weights' (docs/quality.md). The choice's notes say what was chosen and why."""
    if weight_option != "auto":
        return choose(shape, weights, targets, weight_format=weight_option, **kw)
    kept = error = None
    try:
        kept = choose(shape, weights, targets, weight_format="keep", **kw)
    except BudgetTooSmallError as e:
        error = e
    if kept is not None and kept.level >= QUALITY_FLOOR:
        return replace(kept, weights_note=f"weights='auto': the weights keep their dtype (they fit at "
                                          f"1/{round(1 / kept.level)} compression, the quality threshold or coarser)")
    try:
        small = choose(shape, weights, targets, weight_format=EIGHT_BIT_AUTO, **kw)
    except BudgetTooSmallError:
        if kept is None:
            raise error from None
        return replace(kept, weights_note="weights='auto': the weights keep their dtype (8-bit weights fit no better)")
    cost8 = eight_bit_cost()
    small_cost = quality_cost(small.level)[0] + cost8
    if kept is None:
        return replace(small, weights_note=f"weights='auto': weights stored in {EIGHT_BIT_AUTO} because nothing fits "
                                           f"with them in their dtype; 8-bit weights cost about {cost8:.1%} held-out "
                                           "loss (measured: docs/quality.md)")
    kept_cost = quality_cost(kept.level)[0]
    why = (f"(expected held-out loss above AdamW's: kept weights at 1/{round(1 / kept.level)} compression "
           f"{kept_cost:.1%}; {EIGHT_BIT_AUTO} weights at 1/{round(1 / small.level)} {small_cost:.1%}, of which "
           f"{cost8:.1%} for 8 bits; docs/quality.md)")
    if small_cost < kept_cost:
        return replace(small, weights_note=f"weights='auto': weights stored in {EIGHT_BIT_AUTO}, which fit at a coarser "
                                           f"compression than weights in their dtype {why}")
    return replace(kept, weights_note=f"weights='auto': the weights keep their dtype at a finer compression {why}")


def _notes(choice: Choice, source: str, shape: ModelShape | None = None) -> tuple[str, ...]:
    """What the plan chose and why, for the user to read; nothing here asks the user to act."""
    sv = choice.savings
    zero = choice.estimate.details.get("zero")
    notes = [f"budget from {source}" + (f", per rank under {zero}" if zero else ""),
             f"compression c·r/m = 1/{round(1 / choice.level)}: mean relative gradient variance "
             f"{relative_variance(choice.layers):.1f} (0 is exact)"]
    if choice.moved:
        k, total, coarser = choice.moved
        notes[-1] = (f"compression c·r/m = 1/{round(1 / coarser)} for {k} of {total} weight groups (the smallest), "
                     f"1/{round(1 / choice.level)} for the rest, as far as the budget goes: mean relative gradient "
                     f"variance {relative_variance(choice.layers):.1f} (0 is exact)")
    if choice.level < QUALITY_FLOOR:
        cost, extrapolated = quality_cost(choice.level)
        notes.append(f"finer than 1/{round(1 / QUALITY_FLOOR)} because even checkpointing every layer does not fit at "
                     f"1/{round(1 / QUALITY_FLOOR)}: expect held-out loss about {cost:.1%} above a tuned AdamW's "
                     f"({'extrapolated from' if extrapolated else 'measured:'} docs/quality.md)"
                     + (" (finer than 1/32: nothing else fits)" if choice.level < HARD_FLOOR else ""))
    applied = []
    if sv.get("norms") == "recompute":
        applied.append("norms keep only their input")
    applied.append({"act": "act(gate)·up recomputed", "recompute": "MLPs recomputed",
                    "keep": "MLPs keep their activations"}[sv.get("mlp", "act")])
    if sv.get("attention") == "recompute":
        applied.append("attention recomputed")
    elif sv.get("attention") in ATTENTION_8BIT:
        applied.append(f"attention keeps {sv['attention']} q, k, v (lossy gradients)")
    which = sv.get("checkpoint_layers") or ()
    if which:
        applied.append("every layer checkpointed" if which == "all" else f"{len(which)} layers checkpointed")
    if sv.get("loss_chunk"):
        applied.append(f"chunked cross-entropy ({sv['loss_chunk']} tokens at a time; training forwards with labels "
                       "return the loss and logits=None)")
    offloaded = choice.estimate.details.get("offloaded_bytes")
    if offloaded:
        notes.append(f"optimizer states in CPU memory (ZeRO-Offload), not in the budget: {_fmt_bytes(offloaded)} per rank")
    if zero:
        notes.append("DeepSpeed's optimizer steps the coords (fp32 master + AdamW moments, partitioned); memwrap merges "
                     "each step into the frozen weights")
    if choice.optimizer == "projfactor":
        notes.append("optimizer states counted for ProjFactor (memwrap.optimizer(model) builds it): a factored "
                     "second moment instead of subspace AdamW's, which does not fit at this compression; about 1% "
                     "higher loss than subspace AdamW at 600 steps and 2000 steps (docs/quality.md)")
    if choice.weights != "keep":
        notes.append(f"the compressed weights are stored in {choice.weights} with a float32 scale per row and block of "
                     "inputs (the output head keeps its dtype), dequantized one layer at a time in forward and backward "
                     "and updated with unbiased stochastic rounding")
    if choice.weights_note:
        notes.append(choice.weights_note)
    if choice.head:
        notes.append("the output head (lm_head) is compressed like the other linears: with its exact gradient and "
                     "optimizer states the plan does not fit at this compression")
    notes.append("wrap applies: " + ", ".join(applied) + f"; predicted step time +{choice.overhead:.0%} over plain "
                 "training (recomputed FLOPs)")
    if shape is not None and not shape.exact_formulas:
        notes.append(f"activation bytes of {shape.model_type!r} are approximated with the Llama-like formulas "
                     "(tested: llama, mistral, qwen2/3, qwen2/3-moe, mixtral, gpt2, bert)")
    return tuple(notes)


def _validate(budget_gb, batch_size, seq_len) -> None:
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidSettingsError(f"{key}={value!r} must be a positive integer.")
    if budget_gb is not None:
        if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not math.isfinite(budget_gb) \
                or budget_gb <= 0:
            raise InvalidSettingsError(f"budget_gb={budget_gb!r} must be a positive number of gigabytes (1 GB = 1e9 bytes).")


def zero_spec(zero, world_size=None, offload_optimizer=False) -> ZeroSpec | None:
    """The DeepSpeed ZeRO setting a plan counts bytes for (None: no DeepSpeed); InvalidSettingsError for bad input.
    world_size defaults to torch.distributed's when it is initialized, else 1."""
    if zero is None:
        if world_size is not None or offload_optimizer:
            raise InvalidSettingsError("world_size= and offload_optimizer= describe DeepSpeed ZeRO: pass zero=1, 2 or 3 "
                                       "with them (or leave them out for a single process).")
        return None
    if isinstance(zero, bool) or zero not in (1, 2, 3):
        raise InvalidSettingsError(f"zero={zero!r} must be the DeepSpeed ZeRO stage: 1, 2 or 3 (None without DeepSpeed).")
    if world_size is None:
        world_size = torch.distributed.get_world_size() if torch.distributed.is_available() \
            and torch.distributed.is_initialized() else 1
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidSettingsError(f"world_size={world_size!r} must be a positive whole number of ranks.")
    if not isinstance(offload_optimizer, bool):
        raise InvalidSettingsError(f"offload_optimizer={offload_optimizer!r} must be True or False.")
    return ZeroSpec(int(zero), world_size, offload_optimizer)


def refuse_8bit_under_zero(weights: str, zero: ZeroSpec | None) -> None:
    """InvalidSettingsError for 8-bit weights planned under DeepSpeed ZeRO (before anything is planned or changed)."""
    if weights != "keep" and zero is not None:
        raise InvalidSettingsError(f"weights={weights!r} with DeepSpeed ZeRO (zero={zero.stage}): DeepSpeed keeps its "
                                   "own flat copies of the parameters and cannot hold 8-bit weights that memwrap updates "
                                   "itself. Use weights='keep' under DeepSpeed, or train with DDP or FSDP2 (both take "
                                   "8-bit weights).")


def resolve_budget(budget_gb: float | None) -> tuple[int, str]:
    """(budget bytes, where it came from): explicit, else NVML/torch.cuda free minus a margin, else available RAM."""
    if budget_gb is not None:
        return int(budget_gb * 1e9), "budget_gb"
    from .memory import probe

    got = probe()
    why = f" ({'; '.join(got.fallback_reasons)})" if got.fallback_reasons and got.source == "psutil" else ""
    return got.budget_bytes(), f"{got.source} on {got.device}: {_fmt_bytes(got.free_bytes)} free minus a margin{why}"


def default_seq_len(config) -> int:
    limit = getattr(config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    return int(min(DEFAULT_SEQ_LEN, limit))


def _finish(base: Plan, choice: Choice, budget_bytes: int, batch: int, seq: int, dtype: str, source: str,
            shape: ModelShape | None = None) -> Plan:
    memory = tuple(choice.estimate.parts) + (("peak", choice.estimate.peak_bytes),)
    sv = choice.savings
    return replace(base, layers=choice.layers, budget_bytes=budget_bytes, batch_size=batch, seq_len=seq, dtype=dtype,
                   gradient_checkpointing=choice.gradient_checkpointing,
                   chunked_cross_entropy=choice.chunked_cross_entropy, memory=memory,
                   norms=sv["norms"], mlp=sv["mlp"], attention=sv["attention"],
                   checkpoint_layers=sv["checkpoint_layers"], loss_chunk=sv["loss_chunk"],
                   step_time_overhead=round(choice.overhead, 4), optimizer=choice.optimizer, weights=choice.weights,
                   notes=_notes(choice, source, shape))


_DTYPE_NAMES = {4: "fp32", 2: "bf16"}


def _head_target(model: nn.Module, config: WrapConfig, adapter, candidates, allow_meta: bool = False) -> Target | None:
    """The output head as an optional target (head="auto", not already a target): the planner compresses it only
    where that keeps the plan from a finer compression."""
    if config.head != "auto":
        return None
    c = inject.head_candidate(model, adapter, allow_meta=allow_meta)
    if c is None or any(x.module is c.module for x in candidates):
        return None
    return Target(c.name, c.kind, c.in_features, c.out_features, c.num_experts, c.group_key)


VERIFY_ROUNDS = 4  # byte-model budgets tried before the simulated steady-state step fits


def settle(make, run, budget_bytes: int, device, source: str, *, zero=None, verify: bool = True) -> Plan:
    """The plan whose simulated steady-state step plus the card's reserves fits the budget.

    make(analytic_budget) -> Plan chooses with the byte model against `analytic_budget`; run(plan) -> Simulation runs
    its training steps on fake tensors. Starting from the budget less the reserves, each round lowers the byte model's
    budget by what the simulation found beyond the real one, so the plan's peak is the simulated step's, not the sum
    of parts (which misses how they overlap from step 2 on). DeepSpeed ZeRO plans keep the byte model's peak."""
    from . import card

    first = card.reserves(0, device, source)
    frac = card.headroom_fraction() if first else 0.0
    analytic = int((budget_bytes - first.get("cuda context", 0)) / (1 + frac))
    if not verify or zero is not None:
        p = make(analytic)
        note = "peak from the byte model (not simulated" + (": DeepSpeed ZeRO)" if zero is not None else ")")
        return _with_reserves(p, dict(p.memory)["peak"], card.reserves(dict(p.memory)["peak"], device, source), note)
    total = None  # the last plan's simulated steady-state step plus reserves
    for _ in range(VERIFY_ROUNDS):
        try:
            p = make(analytic)
        except BudgetTooSmallError as e:
            if total is None:  # the byte model alone: nothing fits (after the card's reserves, where they apply)
                if not first:
                    raise
                raise BudgetTooSmallError(f"{e} (after reserving the CUDA context and allocator headroom)",
                                          min_budget_bytes=e.min_budget_bytes, max_batch_size=e.max_batch_size) from None
            raise BudgetTooSmallError(
                f"nothing fits a budget of {_fmt_bytes(budget_bytes)}: the closest plan's steady-state training step, "
                f"simulated, needs {_fmt_bytes(total)}" + (" with the CUDA context and allocator headroom" if first else "")
                + " (the byte model alone said it fits); use a smaller batch or sequence, or a larger budget.",
                min_budget_bytes=int(total), max_batch_size=None) from None
        try:
            sim = run(p)
        except Exception as e:  # noqa: BLE001 - a model the simulator cannot run keeps the byte model's peak
            peak = dict(p.memory)["peak"]
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            return _with_reserves(p, peak, card.reserves(peak, device, source),
                                  f"peak from the byte model: the steady-state step could not be simulated ({why})")
        steady = max(sim.steps[-1].values())
        res = card.reserves(steady, device, source)
        total = steady + sum(res.values())
        for _ in range(2):  # the overshoot twice over, then one weight's (waves hold whole pieces: it steps unevenly)
            smaller = _smaller_waves(p, total - budget_bytes) if total > budget_bytes and _step_is_the_peak(sim) else None
            if smaller is None:
                break
            p = replace(p, step_wave_bytes=smaller)  # the step's waves shrink first: speed, never quality
            sim = run(p)
            steady = max(sim.steps[-1].values())
            res = card.reserves(steady, device, source)
            total = steady + sum(res.values())
        if total <= budget_bytes:
            if p.step_wave_bytes:
                p = replace(p, notes=p.notes + (
                    f"the optimizer step works in waves of at most {_fmt_bytes(p.step_wave_bytes)} of temporaries "
                    "(lowered so that the step fits the budget: the same updates, in more kernels)",))
            p = replace(p, phases=tuple(sim.steps[-1].items()))
            return _with_reserves(p, steady, res, f"peak: the steady-state step (step 2 on) simulated on fake tensors; "
                                                  f"the byte model said {_fmt_bytes(dict(p.memory)['peak'])}")
        analytic -= total - budget_bytes + budget_bytes // 200  # what the byte model missed, and 0.5% to spare
    raise BudgetTooSmallError(f"nothing fits a budget of {_fmt_bytes(budget_bytes)}: the simulated steady-state step "
                              f"needs {_fmt_bytes(total)} with the reserves at the closest plan; use a smaller batch or "
                              "sequence, or a larger device.", min_budget_bytes=int(total), max_batch_size=None)


def _step_is_the_peak(sim) -> bool:
    """Whether the optimizer step raised the steady-state step's peak (phases are peaks since the step's start)."""
    steady = sim.steps[-1]
    return steady["optimizer"] > steady["backward"]


def _smaller_waves(p: Plan, overshoot: int) -> int | None:
    """A step_wave_bytes twice `overshoot` (and 1/8) below the wave in use, then one weight's merge (the floor); None
    at the floor."""
    from ..compress.base import MERGE_BYTES_PER_ELEMENT, MERGE_CHUNK_BYTES

    numels = [lp.weight_numel for lp in p.layers]
    current = min(p.step_wave_bytes or MERGE_CHUNK_BYTES, sum(numels) * MERGE_BYTES_PER_ELEMENT)  # the wave in use
    floor = min(MERGE_CHUNK_BYTES, max(numels, default=0) * MERGE_BYTES_PER_ELEMENT)
    if current <= floor:
        return None
    if p.step_wave_bytes:  # lowered once already: the least
        return floor
    return max(floor, current - 2 * overshoot - current // 8)


def _with_reserves(p: Plan, peak: int, res: dict[str, int], note: str) -> Plan:
    """The plan with its peak (bytes allocated at the steady-state step) and the card's reserves as named parts."""
    from . import card

    parts = [(k, v) for k, v in p.memory if k != "peak"] + list(res.items()) + [("peak", int(peak))]
    notes = p.notes + (note,)
    if res:
        notes += (f"the budget also holds the CUDA context ({_fmt_bytes(res['cuda context'])}) and allocator headroom "
                  f"({_fmt_bytes(res['allocator headroom'])}, {card.headroom_fraction():.0%} of the peak, "
                  + ("expandable segments: memwrap turns them on where PYTORCH_CUDA_ALLOC_CONF is unset)"
                     if card.expandable_segments() else "the default allocator, as PYTORCH_CUDA_ALLOC_CONF sets it)"),)
    return replace(p, memory=tuple(parts), notes=notes)


def plan_for_model(model: nn.Module, config: WrapConfig, *, budget_gb=None, batch_size=None, seq_len=None,
                   dtype_bytes: int = 4, zero: ZeroSpec | None = None, verify: bool = True) -> Plan:
    """Find targets and settle (c, r) for each (explicit settings, else by budget); raises before any mutation.
    zero: count one rank's bytes under DeepSpeed ZeRO (`zero_spec`)."""
    _validate(budget_gb, batch_size, seq_len)
    adapter = resolve(model)
    candidates, skipped = inject.find_targets(model, config, adapter)
    if not candidates:
        raise inject.no_targets_error(model, config, skipped)
    base = inject.build_plan(model, config, candidates, skipped, dtype_bytes)
    if config.rank is not None or config.granularity is not None:
        return base
    hf_config = getattr(model, "config", None)
    try:
        shape = ModelShape.from_config(hf_config) if hf_config is not None else None
    except (AttributeError, TypeError, ZeroDivisionError):
        shape = None
    if shape is None or not shape.hidden or not shape.layers:
        return replace(base, notes=base.notes + ("no transformers config: settings from the default c·r ≈ m/64, "
                                                 "not from a memory budget",))
    budget_bytes, source = resolve_budget(budget_gb)
    batch = batch_size or DEFAULT_BATCH_SIZE
    seq = seq_len or default_seq_len(hf_config)
    weights = enumerate_weights(model, exclude=config.exclude)
    targets = [Target(c.name, c.kind, c.in_features, c.out_features, c.num_experts, c.group_key) for c in candidates]
    head = _head_target(model, config, adapter, candidates)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    param_bytes = param.element_size() if param is not None else dtype_bytes

    def make(analytic_budget: int) -> Plan:
        choice = choose_weights(shape, weights, targets, budget_bytes=analytic_budget, batch_size=batch, seq_len=seq,
                                dtype_bytes=dtype_bytes, param_bytes=param_bytes,
                                fixed=config.savings if config.savings_changed() else None,
                                coords_bytes=2 if param is not None and param.dtype == torch.bfloat16 else 4, head=head,
                                zero=zero, weight_option=config.weights)
        return _finish(base, choice, budget_bytes, batch, seq, _DTYPE_NAMES.get(dtype_bytes, f"{dtype_bytes}-byte"),
                       source, shape)

    def run(p: Plan):
        from .simulate import run_plan

        return run_plan(model, p, batch_size=batch, seq_len=seq, steps=2)

    device = param.device if param is not None and param.device.type != "meta" else None
    return settle(make, run, budget_bytes, device, source, zero=zero, verify=verify)


# ---- planning from a config, nothing loaded ---------------------------------------------------------------
def experts_supported() -> bool:
    """Whether this memwrap compresses fused MoE experts (memwrap.compress.experts); otherwise they stay exact."""
    return importlib.util.find_spec("memwrap.compress.experts") is not None


@dataclass(frozen=True)
class ModelSketch:
    """A model known only from its config: shape, weights and compressible targets (from the meta device)."""

    model_class: str
    shape: ModelShape
    weights: list[Weight]
    targets: list[Target]
    max_positions: int = DEFAULT_SEQ_LEN
    skipped: tuple[tuple[str, str], ...] = ()  # what wrap would leave exact, and why
    head: Target | None = None  # the output head, when the planner may compress it (head="auto")


_SKETCHES: dict[tuple, ModelSketch] = {}  # bundled configs never change: their sketches are kept (a few KB each)


def sketch(model: str, config: WrapConfig | None = None, compress_experts: bool | None = None) -> ModelSketch:
    """Read a config (bundled name, local directory, hub id) and enumerate its weights on the meta device.

    compress_experts: None follows this memwrap (`experts_supported()`); True/False forces it (previews).
    """
    config = config or WrapConfig()
    if compress_experts is None:
        compress_experts = experts_supported()
    key = (model.strip().lower(), config, compress_experts)
    if key[0] in BUNDLED and key in _SKETCHES:
        return _SKETCHES[key]
    got = _sketch(model, config, compress_experts)
    if key[0] in BUNDLED:
        _SKETCHES[key] = got
    return got


def _sketch(model: str, config: WrapConfig, compress_experts: bool) -> ModelSketch:
    hf_config = load_config(model)
    meta = meta_model(hf_config)
    adapter = resolve(meta)
    weights = enumerate_weights(meta, exclude=config.exclude)
    # the same targets as wrap would find on the loaded model
    candidates, skipped = inject.find_targets(meta, config, adapter, allow_meta=True)
    targets = [Target(c.name, c.kind, c.in_features, c.out_features, c.num_experts, c.group_key) for c in candidates
               if c.kind != "experts" or compress_experts]
    order = {w.name: i for i, w in enumerate(weights)}
    targets.sort(key=lambda t: order.get(t.name, len(order)))
    left_exact = tuple(skipped)
    return ModelSketch(type(meta).__name__, ModelShape.from_config(hf_config), weights, targets,
                       default_seq_len(hf_config), left_exact, _head_target(meta, config, adapter, candidates, True))


def plan(model: str, budget_gb: float | None = None, batch_size: int | None = None, seq_len: int | None = None,
         dtype: str = "bf16", *, compress_experts: bool | None = None, zero: int | None = None,
         world_size: int | None = None, offload_optimizer: bool = False, verify: bool = True, device: str = "cuda",
         **wrap_kwargs) -> Plan:
    """Plan a model from its config alone (nothing loaded); `wrap(model, plan=...)` applies the result exactly.

    dtype is that of the weights and activations (fp32, bf16, fp16). zero (1, 2, 3), world_size and
    offload_optimizer: the budget is one rank's under DeepSpeed ZeRO. weights="int8"/"fp8" plans 8-bit compressed
    weights, "auto" only where the weights in their dtype do not fit at the quality threshold (the notes say which
    and why; the plan stores the choice). Raises BudgetTooSmallError when
    nothing fits, InvalidSettingsError for bad input or an unknown model. The plan's peak is its steady-state training
    step, simulated on fake tensors (memwrap.simulate), and the budget also holds the CUDA context and allocator
    headroom (memwrap.planning.card) when device is "cuda" (the default; "cpu" reserves neither); verify=False keeps
    the byte model's peak (faster, for sweeps).
    """
    if device not in ("cuda", "cpu"):
        raise InvalidSettingsError(f"device={device!r}: plan for 'cuda' (a GPU: the budget also holds the CUDA context "
                                   "and allocator headroom) or 'cpu'.")
    if not isinstance(model, str | os.PathLike) or not os.fspath(model).strip():
        raise InvalidSettingsError(f"memwrap.plan takes a model name (a family like 'llama-2-7b'), a config.json path "
                                   f"or a local model directory; got {model!r}. To plan a loaded model use "
                                   "memwrap.wrap(model, budget_gb=...).")
    _validate(budget_gb, batch_size, seq_len)
    zero = zero_spec(zero, world_size, offload_optimizer)
    _, dtype_bytes = dtype_from_name(dtype)
    config = WrapConfig(**wrap_kwargs)
    config.validate()
    refuse_8bit_under_zero(config.weights, zero)
    sk = sketch(model, config, compress_experts)
    if not sk.targets:
        raise InvalidSettingsError(f"no compressible layer in {model!r} ({sk.model_class}); check targets=/exclude=.")
    budget_bytes, source = resolve_budget(budget_gb)
    batch = batch_size or DEFAULT_BATCH_SIZE
    seq = seq_len or sk.max_positions

    def choice_at(analytic_budget: int) -> Choice:
        return choose_weights(sk.shape, sk.weights, sk.targets, budget_bytes=analytic_budget, batch_size=batch,
                              seq_len=seq, dtype_bytes=dtype_bytes, param_bytes=dtype_bytes,
                              fixed=config.savings if config.savings_changed() else None,
                              coords_bytes=2 if dtype.lower() in ("bf16", "bfloat16") else 4, head=sk.head, zero=zero,
                              weight_option=config.weights)

    planned = {t.name for t in sk.targets}
    skipped = sk.skipped + tuple((w.name, "fused experts left exact (compress_experts=False)") for w in sk.weights
                                 if w.kind == "experts" and w.name not in planned)
    base = Plan(layers=(), projection=config.projection, refresh_every=config.refresh_every, seed=config.seed,
                share_inputs=config.share_inputs, stochastic_rounding=config.stochastic_rounding, skipped=skipped,
                norms=config.norms, mlp=config.mlp, attention=config.attention, checkpoint_layers=config.checkpoint_layers,
                loss_chunk=config.loss_chunk,
                model_class=sk.model_class)

    def make(analytic_budget: int) -> Plan:
        return _finish(base, choice_at(analytic_budget), budget_bytes, batch, seq, dtype.lower(), source, sk.shape)

    def run(p: Plan):
        from .simulate import run_plan

        return run_plan(model, p, batch_size=batch, seq_len=seq, steps=2, dtype=dtype)

    return settle(make, run, budget_bytes, torch.device(device), source, zero=zero, verify=verify)


def baselines(sk: ModelSketch, *, batch_size: int, seq_len: int, dtype_bytes: int,
              zero: ZeroSpec | None = None) -> dict[str, Estimate]:
    """Plain AdamW and AdamW + gradient checkpointing (every weight exact; per rank under `zero`), for tables."""
    def adamw(ckpt: bool) -> Estimate:
        return estimate(sk.shape, sk.weights, None, batch_size=batch_size, seq_len=seq_len, dtype_bytes=dtype_bytes,
                        param_bytes=dtype_bytes, optimizer="adamw", gradient_checkpointing=ckpt, zero=zero)

    return {"AdamW": adamw(False), "AdamW+ckpt": adamw(True)}
