"""Peak RSS of a training step in this (fresh) process vs the byte model's predicted peak.

    python -m memwrap.planning.rss_probe plain|memwrap BATCH SEQ_LEN

Prints one JSON line: measured (VmHWM growth over two forward/backward/AdamW steps of a 4-layer Llama, hidden 512,
fp32), predicted (memwrap.planning.estimate's peak) and the predicted parts. Run it with MALLOC_MMAP_THRESHOLD_=65536 so RSS
follows live tensors. Used by tests/test_estimate.py and tools/bench_planner.py.
"""

from __future__ import annotations

import json
import sys


def hwm() -> int:
    """Peak RSS of this process image (ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(mode: str, batch_size: int, seq_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ..adapters import resolve
    from ..compress import inject
    from ..config import WrapConfig
    from . import estimate as est

    torch.set_num_threads(1)
    # warm-up: the same ops on a tiny model, so code pages and thread pools exist before the baseline
    warm = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        tie_word_embeddings=False))
    warm_opt = torch.optim.AdamW(warm.parameters())
    zeros = torch.zeros(1, 8, dtype=torch.long)
    warm(input_ids=zeros, labels=zeros).loss.backward()
    warm_opt.step()
    del warm, warm_opt
    base = hwm()
    cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).train()
    shape, weights = est.ModelShape.from_config(cfg), est.enumerate_weights(model)
    layers = None
    if mode == "memwrap":  # what memwrap.wrap(model, rank=8, granularity=8) applies
        config = WrapConfig(rank=8, granularity=8)
        plan = inject.build_plan(model, config, *inject.find_targets(model, config, resolve(model)), dtype_bytes=4)
        inject.apply_plan(model, plan)
        layers = plan.layers
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 8000, (batch_size, seq_len))
    for _ in range(2):  # the second step runs with optimizer states allocated (the steady state)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = hwm()
    e = est.estimate(shape, weights, layers, batch_size=batch_size, seq_len=seq_len, dtype_bytes=4)
    return {"measured": peak - base, "predicted": e.peak_bytes, "parts": dict(e.parts),
            "forward": e.details["forward_peak"], "step": e.details["step_peak"]}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
