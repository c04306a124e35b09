"""Hugging Face Trainer integration: one callback, needed only to resume bit-identically with Trainer's own optimizer.

Training, gradient accumulation, clipping, saving and `save_model` need nothing: memwrap's optimizer step hook
merges after every step of Trainer's AdamW. What a Trainer cannot do by itself is tell memwrap, after
`resume_from_checkpoint` loaded the optimizer state, which projection P each layer was on; memwrap's own
optimizer does that in its `load_state_dict`, any other optimizer needs `memwrap.sync(optimizer)`, which this
callback calls before the first resumed step:

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[memwrap.integrations.MemwrapCallback()])
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..compress.inject import STATE_ATTR
from ..compress.merge import sync
from .checkpoint import PLAN_NAME, read_state, write_state


def _inner(optimizer):
    """accelerate's AcceleratedOptimizer (and similar wrappers) keep the torch optimizer in `.optimizer`."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class MemwrapCallback(TrainerCallback):
    """Calls `memwrap.sync(optimizer)` when training starts (after Trainer restored a checkpoint's optimizer) and
    writes the plan into every checkpoint (`checkpoint-N/memwrap_plan.json`), so a resume can re-wrap exactly
    with `memwrap.wrap(model, plan=".../checkpoint-N/memwrap_plan.json")` even where the planner would now choose
    other settings (e.g. another amount of free GPU memory)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        model = getattr(model, "module", model)  # DDP
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.global_step and model is not None and getattr(model, STATE_ATTR, None) is not None \
                and os.path.isdir(directory):
            read_state(model, directory)  # the step counters, for optimizers that keep no step count of their own
        opt = _inner(optimizer)
        if opt is not None:
            sync(opt)

    def on_save(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)  # DDP
        wrapped = getattr(model, STATE_ATTR, None)
        if wrapped is None or not state.is_world_process_zero:
            return
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(directory):
            wrapped.plan.save(os.path.join(directory, PLAN_NAME))
            write_state(model, directory)
