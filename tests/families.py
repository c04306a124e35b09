"""Tiny configs (no hub) for every architecture family memwrap supports."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128)

CONFIGS = {
    # dense decoders
    "llama": dict(COMMON, intermediate_size=128),
    "mistral": dict(COMMON, intermediate_size=128),
    "qwen2": dict(COMMON, intermediate_size=128),
    "qwen3": dict(COMMON, intermediate_size=128, head_dim=16),
    "gemma": dict(COMMON, intermediate_size=128, head_dim=16),
    "phi3": dict(COMMON, intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # fused MoE families
    "qwen3_moe": dict(COMMON, **MOE, num_experts=8, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen2_moe": dict(COMMON, **MOE, num_experts=8, shared_expert_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "mixtral": dict(COMMON, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "olmoe": dict(COMMON, num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "phimoe": dict(COMMON, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, router_jitter_noise=0.0,
                   input_jitter_noise=0.0),
    "granitemoe": dict(COMMON, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v3": dict(COMMON, **MOE, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0, n_group=1,
                        topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, head_dim=8),
    "glm4_moe": dict(COMMON, **MOE, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0, n_group=1,
                     topk_group=1, head_dim=16),
    "gpt_oss": dict(COMMON, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=16,
                    layer_types=["full_attention", "sliding_attention"], sliding_window=16),
    "qwen3_next": dict(COMMON, **MOE, num_experts=8, head_dim=16, shared_expert_intermediate_size=32,
                       decoder_sparse_step=1, mlp_only_layers=[], linear_num_value_heads=4, linear_num_key_heads=2,
                       linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]),
}
DENSE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")
FUSED_MOE = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "phimoe", "granitemoe", "deepseek_v3", "glm4_moe", "gpt_oss",
             "qwen3_next")


def tiny(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **CONFIGS[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # some families initialise biases / norms to constants; perturb so grads are generic
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.01 * torch.randn_like(p))
    return model
