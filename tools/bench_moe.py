"""MoE benchmark: a tiny Qwen3-MoE-shaped model (8 experts, top-2, 4 layers) on Shakespeare, AdamW vs memwrap.

Same init, same data order, lockstep steps. Table: held-out loss, gradients + optimizer state of the compressed
weights (attention linears and fused experts) and in total, saved-activation bytes of one training forward
(saved-tensor hooks), step-time ratio. Saves a loss plot.

    python tools/bench_moe.py              # 200 steps
    python tools/bench_moe.py --steps 20   # a quick look
"""

from __future__ import annotations

import argparse
import os

import torch

import memwrap
from memwrap.demo import RunSpec, plot_losses, results_table, train_side_by_side


def qwen3_moe_config(hidden=128, layers=4, experts=8, top_k=2, moe_intermediate=128):
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen3_moe", vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden,
                                moe_intermediate_size=moe_intermediate, num_hidden_layers=layers, num_attention_heads=4,
                                num_key_value_heads=4, head_dim=hidden // 4, num_experts=experts,
                                num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
                                max_position_embeddings=512, tie_word_embeddings=False, router_aux_loss_coef=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    specs = [RunSpec("AdamW lr=1e-3", lambda m: None, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), "exact")]
    for c, r in ((4, 8), (4, 4)):
        specs.append(RunSpec(f"memwrap c{c} r{r} lr=2e-3", lambda m, c=c, r=r: memwrap.wrap(m, rank=r, granularity=c),
                             lambda m: memwrap.optimizer(m, lr=2e-3), "ProjFactor"))
    specs.append(RunSpec("AdamW lr=5e-4", lambda m: None, lambda m: torch.optim.AdamW(m.parameters(), lr=5e-4), "exact"))
    eval_at = tuple(s for s in (args.steps // 2, args.steps) if s > 0)
    print(f"Qwen3-MoE-shaped: 4 layers, hidden 128, 8 experts (top-2, expert width 128), byte vocab; batch "
          f"{args.batch_size} x {args.seq_len}; {args.steps} steps\n")
    results = train_side_by_side(specs, config=qwen3_moe_config(), steps=args.steps, batch_size=args.batch_size,
                                 seq_len=args.seq_len, eval_at=eval_at, log_every=25)
    adamw = [r for r in results if r.name.startswith("AdamW")]
    base = min(adamw, key=lambda r: r.heldout[eval_at[-1]])
    print("\n" + results_table(results, eval_at, base, compressed_label="grad+opt compressed"))
    print(f"\nreference: {base.name} (the better AdamW at step {eval_at[-1]}); compressed = attention linears + fused "
          "experts (routers, norms, embeddings and lm_head stay exact); time: step time / first row's.")
    path = plot_losses(results, os.path.join(args.out, "bench_moe.png"), "memwrap vs AdamW, tiny Qwen3-MoE on Shakespeare")
    print(f"plot: {path}" if path else "matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
