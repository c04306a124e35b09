"""memwrap: full-parameter training of dense and MoE transformers in a fraction of the memory.

    plan = memwrap.wrap(model, rank=8, granularity=4)
    optimizer = memwrap.optimizer(model, lr=3e-4)      # or any torch.optim optimizer over model.parameters()
    ... unchanged training loop ...
    memwrap.unwrap(model)                              # plain nn.Linear again, updates merged

Importing memwrap changes nothing outside this package.
"""

from .api import get_plan, optimizer, register_first_moment, report, simulate, skipped_steps, sync, unwrap, wrap
from .config import LayerPlan, Plan, WrapConfig
from .errors import (
    AlreadyWrappedError,
    BudgetTooSmallError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    CheckpointWriteError,
    InvalidSettingsError,
    MemwrapError,
    NonFiniteError,
    NoTargetsError,
    NotWrappedError,
    OptimizerBeforeWrapError,
    PlanMismatchError,
    UnmergedUpdateError,
    UnsupportedArchitectureError,
)
from .integrations import deepspeed_attach, from_pretrained, load, load_optimizer, load_plan, save
from .planning.planner import plan

__version__ = "0.1.0"

__all__ = [
    "wrap", "unwrap", "optimizer", "sync", "get_plan", "Plan", "LayerPlan", "WrapConfig",
    "MemwrapError", "InvalidSettingsError", "NoTargetsError", "AlreadyWrappedError", "NotWrappedError",
    "UnsupportedArchitectureError", "BudgetTooSmallError", "PlanMismatchError",
    "save", "load", "load_optimizer", "load_plan", "CheckpointError", "plan", "simulate",
    "OptimizerBeforeWrapError", "UnmergedUpdateError", "register_first_moment", "report",
    "deepspeed_attach", "skipped_steps", "NonFiniteError", "CheckpointNotFoundError", "CheckpointCorruptError",
    "CheckpointMismatchError", "CheckpointVersionError", "CheckpointWriteError", "from_pretrained",
]
