"""Exceptions a user can cause. Every message says what to do about it."""

from __future__ import annotations


class MemwrapError(Exception):
    """Base class of every error memwrap raises on purpose."""


class InvalidSettingsError(MemwrapError, ValueError):
    """A setting (rank, granularity, budget, ...) is out of range or inconsistent with the model."""


class NoTargetsError(MemwrapError, ValueError):
    """No layer of the model matched what `wrap` was asked to compress."""


class AlreadyWrappedError(MemwrapError, RuntimeError):
    """`wrap` was called on a model that memwrap already wrapped."""


class NotWrappedError(MemwrapError, RuntimeError):
    """An operation that needs a wrapped model got an unwrapped one."""


class UnsupportedArchitectureError(MemwrapError, ValueError):
    """The model has a layer layout memwrap does not know how to compress."""


class BudgetTooSmallError(MemwrapError, ValueError):
    """Nothing fits the memory budget; the message names the smallest budget and the largest batch that fit."""

    def __init__(self, message: str, *, min_budget_bytes: int | None = None, max_batch_size: int | None = None):
        super().__init__(message)
        self.min_budget_bytes = min_budget_bytes
        self.max_batch_size = max_batch_size


class PlanMismatchError(MemwrapError, ValueError):
    """A saved plan does not describe the model it is applied to."""


class OptimizerBeforeWrapError(MemwrapError, RuntimeError):
    """An optimizer holds the dense weights of wrapped layers instead of their coords: it was built before `wrap`."""


class UnmergedUpdateError(MemwrapError, RuntimeError):
    """Something wrote a wrapped layer's coords in a way memwrap cannot see (e.g. through `.data`)."""


class CheckpointError(MemwrapError, ValueError):
    """A checkpoint cannot be written or read; the subclasses say why. Every message names the path."""


class CheckpointNotFoundError(CheckpointError):
    """The checkpoint directory, or a file it needs, does not exist."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is truncated, fails its checksum or cannot be parsed; nothing was loaded into the model."""


class CheckpointMismatchError(CheckpointError, PlanMismatchError):
    """The checkpoint was saved from another model, plan or optimizer than the one it is loaded into."""


class CheckpointVersionError(CheckpointError):
    """The checkpoint was written in a format this memwrap does not know (a newer memwrap)."""


class CheckpointWriteError(CheckpointError):
    """The operating system refused a write of `memwrap.save` (no permission, no space, not a directory, ...); the
    previous checkpoint, if any, is untouched."""


class BypassedWeightError(MemwrapError, RuntimeError):
    """Code outside the wrapped layer reads its frozen weight directly, so the layer's update would be lost."""


class UnsupportedEngineError(MemwrapError, RuntimeError):
    """A training engine manages a wrapped layer's parameters in a way memwrap cannot merge updates from."""


class NonFiniteError(MemwrapError, FloatingPointError):
    """A step's gradient of a wrapped layer is inf or NaN and the model was wrapped with nonfinite="raise"."""

    def __init__(self, message: str, *, layer: str | None = None):
        super().__init__(message)
        self.layer = layer
