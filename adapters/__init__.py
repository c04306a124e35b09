"""Architecture adapters: which modules memwrap compresses and which of them read the same input.

One small module per family, registered in the one table below (`ADAPTERS`, consulted by `resolve`). An adapter
names the config `model_type`s it claims, the sibling projections that share an input (they share one P and one
saved x̃), and the router modules that stay exact. How to compress a module is decided by its kind, not by
the family: nn.Linear and GPT-2's Conv1D by `memwrap.compress.CompressedLinear`, transformers' fused experts by
`memwrap.compress.experts`; 3-D expert weights of any other layout raise `UnsupportedArchitectureError`.
"""

from __future__ import annotations

from .base import ADAPTERS, Adapter, GenericAdapter, resolve
from .bert import BertAdapter
from .dense import DenseDecoderAdapter
from .gpt2 import GPT2Adapter
from .moe import FusedMoEAdapter, PerExpertLinearMoEAdapter

ADAPTERS[:] = [DenseDecoderAdapter(), GPT2Adapter(), BertAdapter(), FusedMoEAdapter(), PerExpertLinearMoEAdapter()]

__all__ = ["ADAPTERS", "Adapter", "GenericAdapter", "resolve", "DenseDecoderAdapter", "GPT2Adapter", "BertAdapter",
           "FusedMoEAdapter", "PerExpertLinearMoEAdapter"]
