"""Shared by the examples/retrofit_*.py recipes: a tiny Llama built from a config (no download) and a learnable stream."""

import torch


def tiny_model(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg)


def token_batches(steps: int, batch: int = 8, seq: int = 32):
    """`steps` batches cycling over 4 fixed ones, so the loss visibly falls within a few steps."""
    fixed = [torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return [fixed[s % 4] for s in range(steps)]


class Tokens(torch.utils.data.Dataset):
    """The 4 fixed batches as a dataset of rows with labels (the Trainer recipes)."""

    def __init__(self):
        self.ids = torch.cat(token_batches(4))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def check(losses, what: str) -> None:
    print(f"{what}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps")
    if not losses[-1] < losses[0] - 0.05:
        raise SystemExit(f"{what}: the loss did not fall")
