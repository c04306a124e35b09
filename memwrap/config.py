"""Frozen dataclasses: what `wrap` was asked (WrapConfig) and what it did (LayerPlan, Plan). Plans round-trip JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidSettingsError, PlanMismatchError

PLAN_FORMAT_VERSION = 1
PROJECTIONS = ("stiefel", "gaussian", "rademacher")  # kinds of random projection P (memwrap.compress.projection)
# what a block keeps for backward besides linear inputs (memwrap.compress.blocks); every option is exact
NORM_OPTIONS = ("keep", "recompute")  # recompute: an RMSNorm keeps only its input
MLP_OPTIONS = ("keep", "act", "recompute")  # act: act(gate)·up recomputed; recompute: the whole MLP keeps its input
# recompute: the attention module keeps only its input; int8/fp8: SDPA keeps 8-bit q, k, v (lossy gradients, opt-in)
ATTENTION_8BIT = ("int8", "fp8")
ATTENTION_OPTIONS = ("keep", "recompute", *ATTENTION_8BIT)
# the causal-LM output head (an untied lm_head): "auto" compresses it only where the budget needs it (the planner),
# "exact" never, "compress" always
HEAD_OPTIONS = ("auto", "exact", "compress")
# an optimizer step whose coords gradients hold inf/NaN: skipped whole (counted, warned), NonFiniteError, or taken
NONFINITE_OPTIONS = ("skip", "raise", "ignore")
# a wrapped layer's frozen W: as it was, or in 8 bits (memwrap.compress.quant); "auto": 8 bits only where the planner
# needs them (a plan stores what was chosen, never "auto")
WEIGHT_OPTIONS = ("keep", "int8", "fp8", "auto")
SAVING_FIELDS = ("norms", "mlp", "attention", "checkpoint_layers", "loss_chunk")


def check_savings(norms, mlp, attention, checkpoint_layers, loss_chunk=0) -> None:
    """InvalidSettingsError unless the block-saving options are valid."""
    if not isinstance(loss_chunk, int) or isinstance(loss_chunk, bool) or loss_chunk < 0:
        raise InvalidSettingsError(f"loss_chunk={loss_chunk!r} must be a number of tokens per chunk of the loss "
                                   "(0: the model's own loss).")
    for key, value, allowed in (("norms", norms, NORM_OPTIONS), ("mlp", mlp, MLP_OPTIONS),
                                ("attention", attention, ATTENTION_OPTIONS)):
        if value not in allowed:
            raise InvalidSettingsError(f"{key}={value!r} is unknown; use one of {', '.join(map(repr, allowed))}.")
    if checkpoint_layers == "all":
        return
    if not isinstance(checkpoint_layers, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in checkpoint_layers):
        raise InvalidSettingsError(f"checkpoint_layers={checkpoint_layers!r} must be 'all' or a list of layer indices "
                                   "(non-negative integers).")


def check_weights(value, auto: bool = True) -> str:
    """InvalidSettingsError unless `value` is a weights= option ("auto" only where the planner resolves it)."""
    allowed = WEIGHT_OPTIONS if auto else WEIGHT_OPTIONS[:-1]
    if not isinstance(value, str) or value not in allowed:
        raise InvalidSettingsError(f"weights={value!r} is unknown; use one of {', '.join(map(repr, allowed))} ('int8' "
                                   "or 'fp8' store the wrapped layers' frozen weights in 8 bits"
                                   + (", 'auto' only where the budget needs it" if auto else "") + ").")
    return value


def as_layer_indices(value):
    """checkpoint_layers as given by a user or read from JSON: 'all', or a sorted tuple of indices."""
    if value is None or value is False:
        return ()
    if value is True or value == "all":
        return "all"
    if isinstance(value, int | str):
        value = (value,)
    try:
        return tuple(sorted(set(value)))
    except TypeError:
        return value  # check_savings says what is wrong


@dataclass(frozen=True)
class LayerPlan:
    """One compressed weight: a linear layer, or one fused expert parameter (E experts of n × m each)."""

    name: str  # qualified module name (for experts: module name + "." + parameter name)
    kind: str  # "linear" | "experts"
    in_features: int  # m
    out_features: int  # n
    c: int  # granularity: the input is split into c blocks of width d = m / c
    r: int  # rank of the projection of each block
    num_experts: int = 1  # E (1 for a plain linear)
    group: str = ""  # layers with the same group read the same input: one P, one saved x̃
    dtype_bytes: int = 4  # bytes per element of the layer's activations

    @property
    def d(self) -> int:
        return self.in_features // self.c

    @property
    def weight_numel(self) -> int:
        return self.num_experts * self.out_features * self.in_features

    @property
    def coords_numel(self) -> int:
        return self.num_experts * self.out_features * self.c * self.r

    @property
    def compression(self) -> float:
        """Saved-input and gradient size relative to the exact layer: c·r / m."""
        return self.c * self.r / self.in_features

    def saved_input_bytes_per_token(self, compressed: bool = True) -> int:
        width = self.c * self.r if compressed else self.in_features
        return width * self.dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WrapConfig:
    """Settings of `memwrap.wrap`."""

    rank: int | None = None  # r per block; None: chosen by the planner
    granularity: int | None = None  # c; None: chosen by the planner
    projection: str = "stiefel"  # "stiefel" | "gaussian" | "rademacher"
    refresh_every: int = 100  # optimizer steps between redraws of P (tools/quality.py: 100 beat 25, 200, 500)
    seed: int = 0  # global seed of every projection
    targets: tuple[str, ...] | None = None  # name filters (substring or glob); None: every float linear
    exclude: tuple[str, ...] = ("lm_head",)  # name filters never wrapped
    share_inputs: bool = True  # siblings reading the same input share P and the saved x̃
    stochastic_rounding: bool = True  # bf16/fp16 weights: merge with stochastic rounding
    norms: str = "recompute"  # see NORM_OPTIONS
    mlp: str = "act"  # see MLP_OPTIONS
    attention: str = "keep"  # see ATTENTION_OPTIONS
    checkpoint_layers: tuple[int, ...] | str = ()  # layers recomputed whole in backward: indices or "all"
    loss_chunk: int = 0  # causal LMs: cross-entropy over this many tokens at a time, logits never whole (0: off)
    head: str = "auto"  # see HEAD_OPTIONS
    nonfinite: str = "skip"  # a step with inf/NaN gradients: see NONFINITE_OPTIONS
    weights: str = "keep"  # see WEIGHT_OPTIONS

    def validate(self) -> None:
        for key in ("rank", "granularity"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidSettingsError(f"{key}={value!r} must be a positive integer (or None to let the planner choose).")
        if not isinstance(self.refresh_every, int) or isinstance(self.refresh_every, bool) or self.refresh_every < 1:
            raise InvalidSettingsError(
                f"refresh_every={self.refresh_every!r} must be a positive integer number of optimizer steps.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InvalidSettingsError(f"seed={self.seed!r} must be a non-negative integer.")
        if self.projection not in PROJECTIONS:
            raise InvalidSettingsError(f"projection={self.projection!r} is unknown; use one of {', '.join(PROJECTIONS)}.")
        check_savings(self.norms, self.mlp, self.attention, self.checkpoint_layers, self.loss_chunk)
        if self.head not in HEAD_OPTIONS:
            raise InvalidSettingsError(f"head={self.head!r} is unknown; use one of {', '.join(map(repr, HEAD_OPTIONS))}.")
        check_weights(self.weights)
        if self.nonfinite not in NONFINITE_OPTIONS:
            raise InvalidSettingsError(f"nonfinite={self.nonfinite!r} is unknown; use one of "
                                       f"{', '.join(map(repr, NONFINITE_OPTIONS))}.")

    @property
    def savings(self) -> dict[str, Any]:
        """The block-saving options: norms, mlp, attention, checkpoint_layers, loss_chunk."""
        return {k: getattr(self, k) for k in SAVING_FIELDS}

    def savings_changed(self) -> bool:
        """Whether any block-saving option differs from its default."""
        defaults = WrapConfig()
        return any(getattr(self, k) != getattr(defaults, k) for k in SAVING_FIELDS)


def _fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Plan:
    """What `wrap` compressed and what it saves. Prints as a table; `save`/`load` round-trip it exactly."""

    layers: tuple[LayerPlan, ...]
    projection: str = "stiefel"
    refresh_every: int = 100
    seed: int = 0
    share_inputs: bool = True
    stochastic_rounding: bool = True
    skipped: tuple[tuple[str, str], ...] = ()  # (module name, why it was left exact)
    # what each block keeps for backward besides linear inputs (see WrapConfig); plans of 0.1.0 get the defaults
    norms: str = "recompute"
    mlp: str = "act"
    attention: str = "keep"
    checkpoint_layers: tuple[int, ...] | str = ()
    loss_chunk: int = 0
    model_class: str = ""
    # filled by the planner when the plan came from a memory budget
    budget_bytes: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    dtype: str | None = None
    gradient_checkpointing: bool = False
    chunked_cross_entropy: bool = False
    memory: tuple[tuple[str, int], ...] = ()  # named parts of the predicted peak, bytes
    phases: tuple[tuple[str, int], ...] = ()  # the steady-state step's simulated peak after each phase, bytes
    step_time_overhead: float | None = None  # predicted step time over plain training (recomputed FLOPs)
    optimizer: str | None = None  # the optimizer whose state bytes the plan counted; memwrap.optimizer builds it
    # the most bytes one wave of the grouped step may take (memwrap.compress.grouped); 0: MERGE_CHUNK_BYTES. The planner
    # lowers it (never below one weight's) where the step, not the forward, is what would exceed the budget
    step_wave_bytes: int = 0
    weights: str = "keep"  # the wrapped layers' frozen W: "keep" (its dtype), "int8" or "fp8" (never "auto")
    notes: tuple[str, ...] = field(default=())

    # ---- derived numbers -------------------------------------------------------------------------
    @property
    def savings(self) -> dict[str, Any]:
        """The block-saving options: norms, mlp, attention, checkpoint_layers, loss_chunk."""
        return {k: getattr(self, k) for k in SAVING_FIELDS}

    @property
    def linear_layers(self) -> tuple[LayerPlan, ...]:
        return tuple(lp for lp in self.layers if lp.kind == "linear")

    @property
    def expert_layers(self) -> tuple[LayerPlan, ...]:
        return tuple(lp for lp in self.layers if lp.kind == "experts")

    def grad_bytes(self, compressed: bool = True, grad_dtype_bytes: int = 4) -> int:
        """Bytes of the weight gradients of the wrapped layers (coords when compressed, full weights otherwise)."""
        return sum((lp.coords_numel if compressed else lp.weight_numel) * grad_dtype_bytes for lp in self.layers)

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    # ---- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = PLAN_FORMAT_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        version = data.pop("format_version", PLAN_FORMAT_VERSION)
        if version != PLAN_FORMAT_VERSION:
            raise PlanMismatchError(
                f"plan format {version} is not {PLAN_FORMAT_VERSION}; re-create it with `memwrap plan ... --save`.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PlanMismatchError(f"plan has unknown fields {sorted(unknown)}; was it written by a newer memwrap?")
        try:
            data["layers"] = tuple(LayerPlan(**lp) for lp in data.get("layers", ()))
        except TypeError as e:
            raise PlanMismatchError(
                f"plan has a malformed layer entry ({e}); re-create it with `memwrap plan ... --save`.") from e
        data["skipped"] = tuple(tuple(s) for s in data.get("skipped", ()))
        data["memory"] = tuple((str(k), int(v)) for k, v in data.get("memory", ()))
        data["phases"] = tuple((str(k), int(v)) for k, v in data.get("phases", ()))
        data["notes"] = tuple(data.get("notes", ()))
        data["checkpoint_layers"] = as_layer_indices(data.get("checkpoint_layers", ()))
        wave = data.get("step_wave_bytes", 0)
        if not isinstance(wave, int) or isinstance(wave, bool) or wave < 0:
            raise PlanMismatchError(f"plan has step_wave_bytes={wave!r}: it must be a non-negative integer (0: the "
                                    "default); re-create the plan with `memwrap plan ... --save`.")
        try:
            check_weights(data.get("weights", "keep"), auto=False)
        except InvalidSettingsError as e:
            raise PlanMismatchError(f"plan has an invalid weights setting: {e} Re-create the plan with "
                                    "`memwrap plan ... --save`.") from None
        plan = cls(**data)
        try:
            check_savings(plan.norms, plan.mlp, plan.attention, plan.checkpoint_layers, plan.loss_chunk)
        except InvalidSettingsError as e:
            raise PlanMismatchError(f"plan has invalid block options: {e}") from None
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanMismatchError(f"plan file is not valid JSON ({e}).") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON atomically (temp file + rename)."""
        from .atomic import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except FileNotFoundError as e:
            raise PlanMismatchError(f"plan file {os.fspath(path)!r} does not exist; pass the path a plan was saved "
                                    "to (memwrap plan MODEL --save plan.json, or Plan.save).") from e
        except (OSError, UnicodeDecodeError) as e:
            raise PlanMismatchError(f"plan file {os.fspath(path)!r} cannot be read ({e}); pass the path of a plan "
                                    "JSON file (memwrap plan MODEL --save plan.json).") from e

    # ---- display ---------------------------------------------------------------------------------
    def table(self, tokens: int | None = None) -> str:
        """A text table: one row per compressed weight, then totals. `tokens` scales saved-input bytes."""
        tokens = tokens or ((self.batch_size or 1) * (self.seq_len or 1) if self.batch_size else None)
        head = f"{'layer':<48} {'kind':<7} {'E':>3} {'n×m':>12} {'c':>4} {'r':>4} {'keep':>7} {'grad saved':>11}"
        if tokens:
            head += f" {'act saved':>11}"
        lines = [head, "-" * len(head)]
        total_grad = total_act = 0
        for lp in self.layers:
            grad_saved = (lp.weight_numel - lp.coords_numel) * 4
            total_grad += grad_saved
            row = (f"{lp.name[-48:]:<48} {lp.kind:<7} {lp.num_experts:>3} {f'{lp.out_features}×{lp.in_features}':>12} "
                   f"{lp.c:>4} {lp.r:>4} {lp.compression:>7.2%} {_fmt_bytes(grad_saved):>11}")
            if tokens:
                act = (lp.saved_input_bytes_per_token(False) - lp.saved_input_bytes_per_token(True)) * tokens
                total_act += act
                row += f" {_fmt_bytes(act):>11}"
            lines.append(row)
        lines.append("-" * len(head))
        summary = (f"{len(self.linear_layers)} linear + {len(self.expert_layers)} expert weights compressed; "
                   f"gradient bytes {_fmt_bytes(self.grad_bytes(False))} -> {_fmt_bytes(self.grad_bytes(True))}")
        if tokens:
            summary += f"; saved inputs {_fmt_bytes(total_act)} smaller at {tokens} tokens (before sharing)"
        lines.append(summary)
        if self.skipped:
            lines.append(f"left exact: {len(self.skipped)} — " + "; ".join(f"{n} ({why})" for n, why in self.skipped[:8])
                         + (" ..." if len(self.skipped) > 8 else ""))
        if self.memory:
            lines.append("predicted peak: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in self.memory))
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
