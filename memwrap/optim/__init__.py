"""memwrap's matching optimizer."""

from .memwrap_optimizer import OPTIMIZER_KINDS, MemwrapOptimizer

__all__ = ["MemwrapOptimizer", "OPTIMIZER_KINDS"]
