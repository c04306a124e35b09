"""Choosing (c, r) per layer from explicit settings (the budget-driven choice builds on this)."""

from __future__ import annotations

from torch import nn

from . import inject
from .adapters import resolve
from .config import Plan, WrapConfig


def plan_for_model(model: nn.Module, config: WrapConfig, *, budget_gb=None, batch_size=None, seq_len=None,
                   dtype_bytes: int = 4) -> Plan:
    """Find targets and settle (c, r) for each; raises before anything is mutated."""
    adapter = resolve(model)
    candidates, skipped = inject.find_targets(model, config, adapter)
    if not candidates:
        raise inject.no_targets_error(model, config, skipped)
    return inject.build_plan(model, config, candidates, skipped, dtype_bytes)
