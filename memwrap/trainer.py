"""Hugging Face Trainer integration: one callback, needed only to resume bit-identically with Trainer's own optimizer.

Training, gradient accumulation, clipping, saving and `save_model` need nothing: memwrap's optimizer step hook
merges after every step of Trainer's AdamW. What a Trainer cannot do by itself is tell memwrap, after
`resume_from_checkpoint` loaded the optimizer state, which projection P each layer was on; memwrap's own
optimizer does that in its `load_state_dict`, any other optimizer needs `memwrap.sync(optimizer)`, which this
callback calls before the first resumed step:

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[memwrap.trainer.MemwrapCallback()])
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .merge import sync


def _inner(optimizer):
    """accelerate's AcceleratedOptimizer (and similar wrappers) keep the torch optimizer in `.optimizer`."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class MemwrapCallback(TrainerCallback):
    """Calls `memwrap.sync(optimizer)` at the start of training, after Trainer restored a checkpoint's optimizer."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = _inner(optimizer)
        if opt is not None:
            sync(opt)
