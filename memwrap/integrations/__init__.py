"""memwrap inside other tools: checkpoints (save/load) and the Hugging Face Trainer callback.

    checkpoint  memwrap.save / load / load_optimizer: safetensors + plan JSON + optimizer state, written atomically
    deepspeed   the merge after each DeepSpeed ZeRO 1/2/3 step (attached at the engine's first forward)
    pretrained  memwrap.from_pretrained: a checkpoint loaded straight into its wrapped 8-bit form, a tensor at a time
    trainer     MemwrapCallback for transformers.Trainer (imported on first use: it needs transformers)
"""

from ..compress.base import ENGINE_CHECKS
from .checkpoint import load, load_optimizer, load_plan, save
from .deepspeed import attach as deepspeed_attach
from .deepspeed import check_unit as _deepspeed_check
from .pretrained import from_pretrained

if _deepspeed_check not in ENGINE_CHECKS:
    ENGINE_CHECKS.append(_deepspeed_check)


def __getattr__(name: str):
    if name == "MemwrapCallback":
        from .trainer import MemwrapCallback

        return MemwrapCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["deepspeed_attach", "from_pretrained", "save", "load", "load_optimizer", "load_plan", "MemwrapCallback"]
