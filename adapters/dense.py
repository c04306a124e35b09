"""Llama-style dense decoders: q/k/v read one normed input, gate/up read one normed input."""

from .base import Adapter


class DenseDecoderAdapter(Adapter):
    name = "dense-decoder"
    model_types = ("llama", "mistral", "mistral3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
                   "granite", "olmo", "olmo2", "olmo3", "cohere", "cohere2", "starcoder2", "stablelm", "smollm3",
                   "ministral", "helium", "glm", "glm4", "exaone4", "arcee", "apertus", "seed_oss", "hunyuan_v1_dense")
    siblings = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("qkv_proj",), ("gate_up_proj",))
