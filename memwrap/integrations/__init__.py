"""memwrap inside other tools: checkpoints (save/load) and the Hugging Face Trainer callback.

    checkpoint  memwrap.save / load / load_optimizer: safetensors + plan JSON + optimizer state, written atomically
    trainer     MemwrapCallback for transformers.Trainer (imported on first use: it needs transformers)
"""

from .checkpoint import load, load_optimizer, load_plan, save


def __getattr__(name: str):
    if name == "MemwrapCallback":
        from .trainer import MemwrapCallback

        return MemwrapCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["save", "load", "load_optimizer", "load_plan", "MemwrapCallback"]
