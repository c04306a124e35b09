"""The compression itself: random projections, compressed linears and fused experts, and the update (merge) path.

    projection   P (d × r) with E[P Pᵀ] = I, regenerated from (seed, layer name, refresh index)
    base         CompressedWeight (lift, merge into W, refresh) and InputGroup (one P, one saved x̃ per input)
    linear       CompressedLinear: nn.Linear / GPT-2 Conv1D that saves x̃ and trains through `coords`
    experts      transformers' fused MoE experts with compressed routed inputs
    merge        the update path: every update in coords reaches W exactly once (optimizer steps, manual loops)
    blocks       whole-layer savings: norms, act(gate)·up, MLP / attention / layer recompute (exact)
    loss         the chunked linear cross-entropy of causal-LM heads
    inject       find what to compress, check it, swap modules in and out
"""

from .base import CompressedWeight, InputGroup
from .experts import ExpertsUnit
from .linear import CompressedLinear

__all__ = ["CompressedWeight", "InputGroup", "CompressedLinear", "ExpertsUnit"]
