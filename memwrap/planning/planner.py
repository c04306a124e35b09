"""Choosing (c, r) per layer (and, where needed to fit, gradient checkpointing / chunked cross-entropy) from a budget.

Gradient quality is the estimator's relative variance (d − r)/r per block (Stiefel P). At a fixed
compression c·r/m it equals m/(c·r) − 1 whatever the split, so the planner walks compression levels from
the finest (c·r = m/2) down and, within a level, splits c·r into blocks of rank r ≈ 8 (VLoRP: finer
granularity at equal c·r trained better). Every layer of one input width gets the same (c, r), so siblings
(q/k/v, gate/up) always share one x̃.

Options in order of preference: no extra measures at levels 1/2 … 1/32; then chunked cross-entropy; then
gradient checkpointing; then both; then levels 1/64, 1/128 with both. Options that do not save bytes over
an earlier one are dropped, so a smaller budget never yields a plan with more bytes. The first option whose
predicted peak fits the budget wins.

Defaults when not given: batch_size 8, seq_len min(2048, the model's max_position_embeddings).
`wrap` never turns on gradient checkpointing or chunked cross-entropy itself: the plan says so in its notes
(`model.gradient_checkpointing_enable()`; a chunked loss in the training loop).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace

from torch import nn

from ..adapters import resolve
from ..compress import inject
from ..compress.projection import estimator_relative_variance
from ..config import LayerPlan, Plan, WrapConfig, _fmt_bytes
from ..errors import BudgetTooSmallError, InvalidSettingsError
from .estimate import Estimate, ModelShape, Weight, dtype_from_name, enumerate_weights, estimate, load_config, meta_model

LEVELS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128)  # c·r / m, finest first
PREFERRED_RANK = 8
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEQ_LEN = 2048
PLAN_OPTIMIZER = "adamw"  # the plan assumes AdamW moments on coords (memwrap.optimizer's ProjFactor needs less)


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


def options() -> list[tuple[float, bool, bool]]:
    """(level, gradient_checkpointing, chunked_cross_entropy) in order of preference."""
    first = LEVELS[:5]
    out = [(lv, False, False) for lv in first] + [(lv, False, True) for lv in first]
    out += [(lv, True, False) for lv in first] + [(lv, True, True) for lv in LEVELS]
    return out


@dataclass(frozen=True)
class Choice:
    layers: tuple[LayerPlan, ...]
    level: float
    gradient_checkpointing: bool
    chunked_cross_entropy: bool
    estimate: Estimate


def _estimate(shape, weights, layers, batch, seq, dtype_bytes, param_bytes, ckpt, chunk) -> Estimate:
    return estimate(shape, weights, layers, batch_size=batch, seq_len=seq, dtype_bytes=dtype_bytes,
                    param_bytes=param_bytes, optimizer=PLAN_OPTIMIZER, gradient_checkpointing=ckpt,
                    chunked_cross_entropy=chunk)


def chain(shape: ModelShape, weights: list[Weight], targets: list[Target], batch: int, seq: int, dtype_bytes: int,
          param_bytes: int) -> list[Choice]:
    """The options in preference order, keeping only those that need strictly fewer bytes than every earlier one."""
    kept: list[Choice] = []
    for level, ckpt, chunk in options():
        layers = layers_at(targets, level, dtype_bytes)
        est = _estimate(shape, weights, layers, batch, seq, dtype_bytes, param_bytes, ckpt, chunk)
        if not kept or est.peak_bytes < kept[-1].estimate.peak_bytes:
            kept.append(Choice(layers, level, ckpt, chunk, est))
    return kept


def choose(shape: ModelShape, weights: list[Weight], targets: list[Target], *, budget_bytes: int, batch_size: int,
           seq_len: int, dtype_bytes: int, param_bytes: int) -> Choice:
    """The most preferred option that fits; BudgetTooSmallError naming the smallest budget and largest batch."""
    options_ = chain(shape, weights, targets, batch_size, seq_len, dtype_bytes, param_bytes)
    for opt in options_:
        if opt.estimate.peak_bytes <= budget_bytes:
            return opt
    need = options_[-1].estimate.peak_bytes
    cheapest = options_[-1]

    def fits(b: int) -> bool:
        return _estimate(shape, weights, cheapest.layers, b, seq_len, dtype_bytes, param_bytes, True,
                         True).peak_bytes <= budget_bytes

    max_batch = 0
    lo, hi = 1, batch_size - 1
    while lo <= hi:  # the peak grows with the batch: bisect
        mid = (lo + hi) // 2
        if fits(mid):
            max_batch, lo = mid, mid + 1
        else:
            hi = mid - 1
    where = (f"fits at batch {max_batch}" if max_batch else
             f"does not fit even at batch 1 with seq_len {seq_len}; use a shorter sequence or a larger device")
    raise BudgetTooSmallError(
        f"nothing fits a budget of {_fmt_bytes(budget_bytes)}: needs at least {_fmt_bytes(need)} at batch "
        f"{batch_size} × seq_len {seq_len} (with the smallest rank, gradient checkpointing and chunked "
        f"cross-entropy); {where}.", min_budget_bytes=int(need), max_batch_size=max_batch)


def _notes(choice: Choice, source: str, shape: ModelShape | None = None) -> tuple[str, ...]:
    notes = [f"budget from {source}",
             f"compression c·r/m = 1/{round(1 / choice.level)}: mean relative gradient variance "
             f"{relative_variance(choice.layers):.1f} (0 is exact)"]
    if shape is not None and not shape.exact_formulas:
        notes.append(f"activation bytes of {shape.model_type!r} are approximated with the Llama-like formulas "
                     "(tested: llama, mistral, qwen2/3, qwen2/3-moe, mixtral, bert)")
    if choice.gradient_checkpointing:
        notes.append("needs gradient checkpointing to fit: call model.gradient_checkpointing_enable() "
                     "(wrap does not turn it on)")
    if choice.chunked_cross_entropy:
        notes.append("needs chunked cross-entropy to fit: compute the loss over sequence chunks of 1024 tokens "
                     "(wrap does not change the loss)")
    return tuple(notes)


def _validate(budget_gb, batch_size, seq_len) -> None:
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidSettingsError(f"{key}={value!r} must be a positive integer.")
    if budget_gb is not None:
        if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not math.isfinite(budget_gb) \
                or budget_gb <= 0:
            raise InvalidSettingsError(f"budget_gb={budget_gb!r} must be a positive number of gigabytes (1 GB = 1e9 bytes).")


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
    return replace(base, layers=choice.layers, budget_bytes=budget_bytes, batch_size=batch, seq_len=seq, dtype=dtype,
                   gradient_checkpointing=choice.gradient_checkpointing,
                   chunked_cross_entropy=choice.chunked_cross_entropy, memory=memory,
                   notes=_notes(choice, source, shape))


_DTYPE_NAMES = {4: "fp32", 2: "bf16"}


def plan_for_model(model: nn.Module, config: WrapConfig, *, budget_gb=None, batch_size=None, seq_len=None,
                   dtype_bytes: int = 4) -> Plan:
    """Find targets and settle (c, r) for each (explicit settings, else by budget); raises before any mutation."""
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
    param_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point()), dtype_bytes)
    choice = choose(shape, weights, targets, budget_bytes=budget_bytes, batch_size=batch, seq_len=seq,
                    dtype_bytes=dtype_bytes, param_bytes=param_bytes)
    return _finish(base, choice, budget_bytes, batch, seq, _DTYPE_NAMES.get(dtype_bytes, f"{dtype_bytes}-byte"), source,
                   shape)


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


def sketch(model: str, config: WrapConfig | None = None, compress_experts: bool | None = None) -> ModelSketch:
    """Read a config (bundled name, local directory, hub id) and enumerate its weights on the meta device.

    compress_experts: None follows this memwrap (`experts_supported()`); True/False forces it (previews).
    """
    config = config or WrapConfig()
    if compress_experts is None:
        compress_experts = experts_supported()
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
                       default_seq_len(hf_config), left_exact)


def plan(model: str, budget_gb: float | None = None, batch_size: int | None = None, seq_len: int | None = None,
         dtype: str = "bf16", *, compress_experts: bool | None = None, **wrap_kwargs) -> Plan:
    """Plan a model from its config alone (nothing loaded); `wrap(model, plan=...)` applies the result exactly.

    dtype is that of the weights and activations (fp32, bf16, fp16). Raises BudgetTooSmallError when
    nothing fits, InvalidSettingsError for bad input or an unknown model.
    """
    _validate(budget_gb, batch_size, seq_len)
    _, dtype_bytes = dtype_from_name(dtype)
    config = WrapConfig(**wrap_kwargs)
    config.validate()
    sk = sketch(model, config, compress_experts)
    if not sk.targets:
        raise InvalidSettingsError(f"no compressible layer in {model!r} ({sk.model_class}); check targets=/exclude=.")
    budget_bytes, source = resolve_budget(budget_gb)
    batch = batch_size or DEFAULT_BATCH_SIZE
    seq = seq_len or sk.max_positions
    choice = choose(sk.shape, sk.weights, sk.targets, budget_bytes=budget_bytes, batch_size=batch, seq_len=seq,
                    dtype_bytes=dtype_bytes, param_bytes=dtype_bytes)
    planned = {t.name for t in sk.targets}
    skipped = sk.skipped + tuple((w.name, "fused experts left exact (compress_experts=False)") for w in sk.weights
                                 if w.kind == "experts" and w.name not in planned)
    base = Plan(layers=(), projection=config.projection, refresh_every=config.refresh_every, seed=config.seed,
                share_inputs=config.share_inputs, stochastic_rounding=config.stochastic_rounding, skipped=skipped,
                norms=config.norms, mlp=config.mlp, attention=config.attention, checkpoint_layers=config.checkpoint_layers,
                model_class=sk.model_class)
    return _finish(base, choice, budget_bytes, batch, seq, dtype.lower(), source, sk.shape)


def baselines(sk: ModelSketch, *, batch_size: int, seq_len: int, dtype_bytes: int) -> dict[str, Estimate]:
    """Plain AdamW and AdamW + gradient checkpointing (every weight exact), for comparison tables."""
    return {
        "AdamW": _estimate(sk.shape, sk.weights, None, batch_size, seq_len, dtype_bytes, dtype_bytes, False, False),
        "AdamW+ckpt": _estimate(sk.shape, sk.weights, None, batch_size, seq_len, dtype_bytes, dtype_bytes, True, False),
    }
