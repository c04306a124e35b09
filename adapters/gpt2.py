"""GPT-2 family: Conv1D layers (weight stored [in, out]); c_attn holds q, k and v fused."""

from .base import Adapter


class GPT2Adapter(Adapter):
    name = "gpt2"
    model_types = ("gpt2", "gpt_bigcode", "imagegpt", "decision_transformer")
    siblings = ()  # c_attn / c_fc each read their own input
    norm_names = ("ln_1", "ln_2", "ln_f")
    mlp_names = ("mlp",)
    attention_names = ("attn",)
