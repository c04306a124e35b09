"""MoE families. Fused experts (transformers 5.x `@use_experts_implementation`) go through memwrap.compress.experts;
per-expert nn.Linear MoE (SwitchTransformers, NLLB-MoE) through the linear path. Routers stay exact."""

from .base import Adapter

FUSED_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "olmoe", "flex_olmo", "deepseek_v2",
                   "deepseek_v3", "phimoe", "granitemoe", "granitemoeshared", "granitemoehybrid", "glm4_moe",
                   "glm4_moe_lite", "gpt_oss", "dots1", "ernie4_5_moe", "hunyuan_v1_moe", "minimax", "lfm2_moe",
                   "exaone_moe", "jamba")


class FusedMoEAdapter(Adapter):
    name = "fused-moe"
    model_types = FUSED_MOE_TYPES
    siblings = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
    router_names = ("gate", "router", "shared_expert_gate")
    norm_names = Adapter.norm_names + ("q_a_layernorm", "kv_a_layernorm")  # DeepSeek's low-rank attention
    mlp_names = ("mlp", "block_sparse_moe")  # GraniteMoE names its MoE block block_sparse_moe


class PerExpertLinearMoEAdapter(Adapter):
    name = "per-expert-linear-moe"
    model_types = ("switch_transformers", "nllb-moe")
    siblings = (("q", "k", "v"),)
    norm_names = ("layer_norm", "final_layer_norm")
    mlp_names = ("mlp",)
    attention_names = ("SelfAttention", "EncDecAttention")
