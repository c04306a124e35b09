"""Training benchmark: tiny Llama-shaped model on Shakespeare, exact AdamW vs memwrap variants, same init and data.

Prints a table of held-out loss at steps 100/200/300, bytes of gradients + optimizer state (for the linear layers
memwrap compresses, and in total), saved-activation bytes of one training forward (saved-tensor hooks), and the
step-time ratio to AdamW (all runs stepped in lockstep, so they share the machine's load). Saves a loss plot.

    python tools/bench_train.py                 # the full run (300 steps)
    python tools/bench_train.py --steps 30      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import memwrap
from memwrap.demo import RunSpec, llama_config, plot_losses, results_table, train_side_by_side


def specs(lr: float, refresh_every: int, sweep_lrs: tuple[float, ...] = ()) -> list[RunSpec]:
    def wrap(c, r, **kw):
        return lambda m: memwrap.wrap(m, rank=r, granularity=c, refresh_every=refresh_every, **kw)

    def mw_opt(**kw):
        return lambda m: memwrap.optimizer(m, lr=lr, **kw)

    def torch_adamw(m, lr=lr):
        return torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)

    out = [
        RunSpec("AdamW", lambda m: None, torch_adamw, "exact, full model"),
        RunSpec("ProjFactor c4 r8", wrap(4, 8), mw_opt(kind="projfactor"), "memwrap.optimizer(kind='projfactor')"),
        RunSpec("subspace AdamW c4 r8", wrap(4, 8), mw_opt(kind="adamw"), "memwrap.optimizer (default)"),
        RunSpec("subspace AdamW c4 r8 head", wrap(4, 8, head="compress"), mw_opt(kind="adamw"),
                "lm_head compressed too (what a tight plan does)"),
        RunSpec("torch AdamW c4 r8", wrap(4, 8), torch_adamw, "user's torch.optim.AdamW on coords"),
        RunSpec("ProjFactor+EF c4 r8", wrap(4, 8), mw_opt(error_feedback=True), "error_feedback=True"),
        RunSpec("ProjFactor c4 r8 attn int8", wrap(4, 8, attention="int8"), mw_opt(), "attention='int8' (lossy)"),
        RunSpec("ProjFactor c4 r8 attn fp8", wrap(4, 8, attention="fp8"), mw_opt(), "attention='fp8' (lossy)"),
    ]
    for c, r in ((1, 32), (16, 2), (32, 1)):  # granularity sweep at fixed c·r = 32
        out.append(RunSpec(f"ProjFactor c{c} r{r}", wrap(c, r), mw_opt(), "granularity sweep, c·r = 32"))
    for other in sweep_lrs:  # learning-rate sweep: each method is compared at its best
        out.append(RunSpec(f"AdamW lr={other:g}", lambda m: None, lambda m, o=other: torch_adamw(m, o), "exact, lr sweep"))
        out.append(RunSpec(f"ProjFactor c4 r8 lr={other:g}", wrap(4, 8),
                           lambda m, o=other: memwrap.optimizer(m, lr=o), "lr sweep"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--refresh-every", type=int, default=25)
    ap.add_argument("--sweep-lrs", default="1e-3,5e-4", help="extra learning rates for AdamW and ProjFactor c4 r8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    sweep = tuple(float(x) for x in args.sweep_lrs.split(",") if x)
    runs = specs(args.lr, args.refresh_every, sweep)
    if args.only:
        keep = set(args.only.split(","))
        runs = [s for s in runs if s.name in keep or s.name == "AdamW"]
    eval_at = tuple(s for s in (100, 200, 300) if s <= args.steps) or (args.steps,)
    if args.steps > eval_at[-1]:  # long runs are judged at their end too (the gap to AdamW grows with steps)
        eval_at += (args.steps,)
    config = llama_config(hidden=256, layers=4, intermediate=768, heads=4)
    print(f"Llama-shaped: 4 layers, hidden 256, intermediate 768, byte vocab 256; batch {args.batch_size} x "
          f"{args.seq_len}; lr {args.lr} unless a row says otherwise, refresh_every {args.refresh_every}, "
          f"{args.steps} steps\n")
    results = train_side_by_side(runs, config=config, steps=args.steps, batch_size=args.batch_size,
                                 seq_len=args.seq_len, eval_at=eval_at, log_every=25)
    adamw_runs = [r for r in results if r.name.startswith("AdamW")]
    base = min(adamw_runs, key=lambda r: r.heldout[eval_at[-1]])  # the best-tuned AdamW is the reference
    table = results_table(results, eval_at, base, compressed_label="grad+opt linears")
    print("\n" + table)
    print(f"\nreference for 'vs AdamW' and the ratios: {base.name} (the best AdamW learning rate at step {eval_at[-1]})")
    print("\nloss: held-out (tail of the corpus, never trained on); grad+opt linears: gradients + optimizer state of the "
          "compressed weights (coords for memwrap); saved act: one training forward, saved-tensor hooks; "
          "time: step time / AdamW's.")
    with open(os.path.join(args.out, "bench_train.json"), "w") as f:
        json.dump({"args": vars(args), "table": table,
                   "runs": [{"name": r.name, "note": r.note, "heldout": r.heldout, "train": r.train_losses}
                            for r in results]}, f)
    path = plot_losses(results, os.path.join(args.out, "bench_train.png"), "memwrap vs AdamW, tiny Llama on Shakespeare")
    print(f"plot: {path}" if path else "matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
