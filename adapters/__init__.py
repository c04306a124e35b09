"""Architecture adapters: which modules memwrap compresses and which of them read the same input.

One small module per family; `ADAPTERS` is the one table `memwrap.inject` consults. An adapter answers:
  * `sibling_groups(model)`: name -> group key for layers that read one input tensor (share P and x̃);
  * `expert_blocks(model)`: fused MoE expert modules and their layout (see memwrap.experts).
The generic dense adapter applies to every model no family claims.
"""

from __future__ import annotations

from .base import Adapter, GenericAdapter, resolve

__all__ = ["Adapter", "GenericAdapter", "resolve"]
