"""Kernels and host syncs per training step, plain vs memwrap, at several depths: the CPU proxy of a GPU step's
launch overhead (memwrap.planning.opcount: every ATen op a step dispatches, views and allocations left out; host syncs
`_local_scalar_dense` / `nonzero` / ... counted apart).

    python tools/bench_ops.py                          # llama-shaped and qwen3-moe-shaped, 2 / 8 / 32 layers
    python tools/bench_ops.py --layers 2 8 --hidden 256 --dtype fp32
    python tools/bench_ops.py --layers 2 8 --weights int8   # memwrap's weights stored in 8 bits (wrap(weights=...))

Each row trains 3 steps on random tokens and counts the third (the steady state). Columns: forward / backward /
optimizer kernel ops of plain training (torch AdamW, foreach) and of memwrap (`wrap(rank, granularity)` at 1/8, default
savings) stepped by `memwrap.optimizer` and by torch AdamW (foreach; memwrap merges after its step), and the host syncs
of a whole step. torch's own AdamW reads its CPU step counters on the host (`.item()`, no device sync on a GPU): those
reads are in the torch columns and are not memwrap's.

memwrap's step works in waves of at most 64 MB of temporaries on a GPU (16 MB on a CPU, where that measures faster):
its kernel count is flat in depth until the model's weights fill more than one wave, then grows with the model's bytes
(each further wave being 16-64 MB of work, never launch-bound). The next column gives the waves of one step on this
CPU and on a GPU. The last: the optimizer step's memory traffic per parameter (bytes every kernel reads and writes,
memwrap.planning.opcount), what bounds a step of few kernels on a GPU; fused AdamW moves 14 B per bf16 parameter
(reads weight, gradient and two moments, writes three), 28 in fp32.
"""

from __future__ import annotations

import argparse

import torch

import memwrap
from memwrap.planning.opcount import count_step


def build(family: str, layers: int, hidden: int, dtype=torch.bfloat16):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=256, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=256, tie_word_embeddings=False)
    if family == "llama":
        config = AutoConfig.for_model("llama", intermediate_size=hidden, num_key_value_heads=2, **common)
    else:
        config = AutoConfig.for_model("qwen3_moe", intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                                      num_key_value_heads=2, head_dim=hidden // 4, num_experts=8, num_experts_per_tok=2,
                                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def waves(model) -> str:
    from memwrap.compress import grouped, merge

    units = merge.units_of(model)
    cpu = len(grouped.waves_of(grouped.buckets_of(units)))
    saved = grouped.CPU_WAVE_BYTES
    grouped.CPU_WAVE_BYTES = grouped.MERGE_CHUNK_BYTES  # as a GPU cuts them
    try:
        gpu = len(grouped.waves_of(grouped.buckets_of(units)))
    finally:
        grouped.CPU_WAVE_BYTES = saved
    return f"{cpu}/{gpu}"


def measure(family: str, layers: int, hidden: int, how: str, batch: int, seq: int, dtype,
            weights: str = "keep") -> tuple[dict, str, int]:
    model = build(family, layers, hidden, dtype)
    params = sum(p.numel() for p in model.parameters())
    if how != "plain":  # 1/8: blocks of hidden/4, rank 1/8 of that
        memwrap.wrap(model, rank=hidden // 4 // 8, granularity=4, weights=weights)
    if how == "memwrap.optimizer":
        opt = memwrap.optimizer(model, lr=1e-4)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    return count_step(model, opt, ids, ids), ("" if how == "plain" else waves(model)), params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--families", nargs="+", default=["llama", "qwen3_moe"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--weights", choices=["keep", "int8", "fp8"], default="keep", help="memwrap's wrapped weights")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hows = ("plain", "memwrap.optimizer", "memwrap + torch AdamW")
    print(f"kernel ops per step (forward / backward / optimizer) and host syncs per whole step; hidden {args.hidden}, "
          f"{args.dtype}, memwrap's weights {args.weights}")
    print(f"{'model':<12}{'layers':>7}  " + "".join(f"{h:>34}" for h in hows) + f"{'waves cpu/gpu':>15}"
          f"{'opt B/param':>23}")
    for family in args.families:
        for layers in args.layers:
            cells, traffic = [], []
            for how in hows:
                c, wave_count, params = measure(family, layers, args.hidden, how, args.batch_size, args.seq_len, dtype,
                                                 args.weights)
                traffic.append(f"{c['optimizer'].bytes / params:.0f}")
                syncs = sum(x.n_syncs for x in c.values())
                cells.append(f"{c['forward'].n_kernels:>6} /{c['backward'].n_kernels:>6} /{c['optimizer'].n_kernels:>5}"
                             f"  syncs {syncs:>4}")
            print(f"{family:<12}{layers:>7}  " + "".join(f"{cell:>34}" for cell in cells) + f"{wave_count:>15}"
                  f"{' / '.join(traffic):>23}")


if __name__ == "__main__":
    main()
