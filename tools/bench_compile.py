"""torch.compile on plain and wrapped models, side by side in one run: graph breaks (torch._dynamo.explain), compile
time (the first compiled step, minus an eager step), steady-state step time of eager vs compiled, and the loss gap
between the compiled and the eager run after the same steps (same init, data and optimizer).

    python tools/bench_compile.py                          # llama, gpt2, qwen3_moe; inductor
    python tools/bench_compile.py --families llama --backend aot_eager --steps 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch._dynamo as dynamo

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import memwrap  # noqa: E402

VARIANTS = {"plain": None, "wrapped (default)": {}, "wrapped, recompute": {"mlp": "recompute", "attention": "recompute"}}


def build(family: str, option):
    from families import tiny
    from transformers import AutoConfig, AutoModelForCausalLM

    if family == "llama-256":  # a little wider than the tests' models
        cfg = AutoConfig.for_model("llama", vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = tiny(family)
    model.loss_type = "ForCausalLM"  # transformers logs (a graph break) on every call while it is unset (GPT-2)
    if option is not None:
        memwrap.wrap(model, rank=4, granularity=2, refresh_every=4, **option)
        opt = memwrap.optimizer(model, lr=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def step(forward, opt, ids) -> float:
    loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["llama-256", "gpt2", "qwen3_moe"])
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = lambda f: 256 if f == "llama-256" else 128  # noqa: E731
    head = (f"{'family':<11}{'model':<21}{'graphs':>7}{'breaks':>7}{'compile s':>10}{'eager ms':>10}{'compiled ms':>12}"
            f"{'speed-up':>9}{'Δloss':>10}")
    print(f"backend {args.backend}, batch {args.batch_size} × {args.seq_len}, {args.steps} steps (P refreshed every 4), "
          f"eager and compiled stepped alternately; {args.threads} threads\n")
    print(head)
    print("-" * len(head))
    for family in args.families:
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, vocab(family), (args.batch_size, args.seq_len), generator=g) for _ in range(4)]
        for name, option in VARIANTS.items():
            dynamo.reset()
            model, _ = build(family, option)
            explained = dynamo.explain(lambda i, m=model: m(input_ids=i, labels=i).loss)(batches[0])
            dynamo.reset()
            eager, eager_opt = build(family, option)
            comp_model, comp_opt = build(family, option)
            compiled = torch.compile(comp_model, backend=args.backend)
            t0 = time.perf_counter()
            step(eager, eager_opt, batches[0])
            eager_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            step(compiled, comp_opt, batches[0])
            compile_s = time.perf_counter() - t0 - eager_first
            times = {"eager": [], "compiled": []}
            losses = {}
            for i in range(1, args.steps + 1):
                ids = batches[i % len(batches)]
                order = (("eager", eager, eager_opt), ("compiled", compiled, comp_opt))
                for key, fwd, opt in (order if i % 2 else order[::-1]):
                    t0 = time.perf_counter()
                    losses[key] = step(fwd, opt, ids)
                    times[key].append(time.perf_counter() - t0)
            e_ms = 1e3 * sum(times["eager"]) / len(times["eager"])
            c_ms = 1e3 * sum(times["compiled"]) / len(times["compiled"])
            print(f"{family:<11}{name:<21}{explained.graph_count:>7}{explained.graph_break_count:>7}{compile_s:>10.1f}"
                  f"{e_ms:>10.1f}{c_ms:>12.1f}{e_ms / c_ms:>8.2f}×{losses['compiled'] - losses['eager']:>+10.1e}")
        print()


if __name__ == "__main__":
    main()
