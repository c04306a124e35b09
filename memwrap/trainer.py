"""`memwrap.trainer.MemwrapCallback`, the documented name; the callback lives in memwrap.integrations.trainer."""

from .integrations.trainer import MemwrapCallback

__all__ = ["MemwrapCallback"]
