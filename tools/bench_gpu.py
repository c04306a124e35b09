"""On a CUDA GPU: does `wrap(budget_gb=...)` hold the budget, and where does a step's time go?

    python tools/bench_gpu.py                       # all three runs below
    python tools/bench_gpu.py --runs llama-2-7b@24  # one run: MODEL@BUDGET_GB, or MODEL@plain (AdamW + checkpointing)
    python tools/bench_gpu.py --runs llama-2-7b@12:int8 --batch-size 1   # 8-bit weights: MODEL@BUDGET_GB:WEIGHTS
    python tools/bench_gpu.py --speed               # plain vs memwrap step time, side by side, on the speed shapes

Each run builds the model from its bundled config (random weights, bf16, sdpa) on the GPU and trains `--steps` steps
on random tokens (labels = inputs). memwrap runs are wrapped with `wrap(budget_gb=B, batch_size, seq_len)` and trained
under `torch.cuda.set_per_process_memory_fraction(B / total)`, which acts like a card of B GB; "plain" is torch AdamW
(fused) with transformers' gradient checkpointing, uncapped. Printed per run: the plan (its notes), predicted vs
measured max_memory_allocated after each phase of every step (peaks reset at each step's start; predicted = the plan's
simulation), max_memory_reserved, step time, tokens/s, MFU (6 · parameters · tokens / time / the GPU's bf16 dense
peak), and the step-time breakdown (forward / backward / optimizer, medians of steps 2 on).
Default runs: Llama-2-7B at 24 GB (batch 8 × 2048), Qwen1.5-MoE-A2.7B at 40 GB, and Llama-2-7B plain.

--speed: for each shape, plain training (torch AdamW, fused=True) and memwrap at a fixed 1/8 (`wrap(rank=hidden/32,
granularity=4)`, default savings, `memwrap.optimizer`, eager and with `compile_step=True` as "memwrap+cs") on the same
model, alternating steps so all see the same GPU state; medians of steps 3 on. Shapes: TinyLlama-1.1B (hidden 2048,
22 layers) at 4 × 2048, Qwen3-MoE (hidden 1024, 8 layers, 64 experts, top-8) at 4 × 2048, a small Llama (hidden 1024,
4 layers) at 4 × 1024 under torch.compile.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import memwrap
from memwrap.planning import estimate as est

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(name: str):
    config = est.load_config(name)
    config._attn_implementation = "sdpa"
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def run(spec: str, batch: int, seq: int, steps: int) -> None:
    name, _, budget = spec.partition("@")
    budget, _, weights = budget.partition(":")
    plain = budget == "plain"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(name)
    params = sum(p.numel() for p in model.parameters())
    total = torch.cuda.get_device_properties(0).total_memory
    sim = None
    if plain:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        print(f"== {name}: plain AdamW (fused) + HF gradient checkpointing, batch {batch} × {seq}, uncapped")
    else:
        plan = memwrap.wrap(model, budget_gb=float(budget), batch_size=batch, seq_len=seq, weights=weights or "keep")
        torch.cuda.empty_cache()  # (the bf16 weights an 8-bit plan replaced go back before the cap)
        print(f"== {name} at {budget} GB (cap {float(budget) * 1e9 / total:.3f} of {total / 1e9:.1f} GB), "
              f"batch {batch} × {seq}, weights {plan.weights}")
        print("\n".join("   " + n for n in plan.notes))
        print("   plan parts (GB): " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in plan.memory))
        sim = memwrap.simulate(name, plan, steps=min(steps, 3))
        torch.cuda.set_per_process_memory_fraction(float(budget) * 1e9 / total)
        opt = memwrap.optimizer(model, lr=1e-5)
    model.train()
    times = {"forward": [], "backward": [], "optimizer": [], "step": []}
    print(f"{'step':<6}{'phase':<11}{'predicted GB':>14}{'allocated GB':>14}{'ratio':>8}{'reserved GB':>13}")
    try:
        for step in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            marks = [time.perf_counter()]
            measured = {}
            loss = model(input_ids=ids, labels=ids).loss
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            measured["forward"] = torch.cuda.max_memory_allocated()
            loss.backward()
            del loss
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            measured["backward"] = torch.cuda.max_memory_allocated()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            measured["optimizer"] = torch.cuda.max_memory_allocated()
            for phase, a, b in zip(("forward", "backward", "optimizer"), marks, marks[1:], strict=False):
                times[phase].append(b - a)
            times["step"].append(marks[-1] - marks[0])
            for phase, got in measured.items():
                want = sim.steps[min(step, len(sim.steps) - 1)][phase] if sim is not None else None
                print(f"{step + 1:<6}{phase:<11}{'-' if want is None else f'{want / 1e9:.3f}':>14}{got / 1e9:>14.3f}"
                      f"{'-' if want is None else f'{got / want:.3f}':>8}{torch.cuda.max_memory_reserved() / 1e9:>13.3f}")
    except torch.cuda.OutOfMemoryError as e:
        print(f"   OUT OF MEMORY at step {step + 1}: {str(e).splitlines()[0]}")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    if len(times["step"]) > 1:
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        tokens = batch * seq
        tflops = 6 * params * tokens / med["step"] / 1e12
        peak = peak_tflops()
        print(f"   step {med['step']:.3f} s (forward {med['forward'] * 1e3:.0f} ms, backward {med['backward'] * 1e3:.0f} "
              f"ms, optimizer {med['optimizer'] * 1e3:.0f} ms); {tokens / med['step']:.0f} tokens/s; "
              f"{tflops:.0f} TFLOP/s" + (f", MFU {tflops / peak:.1%}" if peak else ""))
    del model, opt
    torch.cuda.empty_cache()


SPEED_SHAPES = {
    "tinyllama-1.1b": (dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, vocab_size=32000), 4, 2048, False),
    "qwen3-moe-64x": (dict(model_type="qwen3_moe", hidden_size=1024, intermediate_size=3072, moe_intermediate_size=768,
                           num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                           num_experts=64, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                           vocab_size=32000), 4, 2048, False),
    "llama-small-compiled": (dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                  num_attention_heads=16, num_key_value_heads=16, vocab_size=32000), 4, 1024, True),
    # a dry run of this script's code paths on a CPU (--device cpu), before GPU time is spent on it
    "tiny": (dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256), 2, 32, False),
    "cpu-h512": (dict(model_type="llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512), 4, 128, False),
    "tiny-compiled": (dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=256), 2, 32, True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def speed(name: str, steps: int, device: torch.device) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw, batch, seq, compiled = SPEED_SHAPES[name]
    kw = dict(kw)
    config = AutoConfig.for_model(kw.pop("model_type"), max_position_embeddings=seq, tie_word_embeddings=False, **kw)
    config._attn_implementation = "sdpa"
    runs = {}
    for how in ("plain", "memwrap", "memwrap+cs"):
        torch.manual_seed(0)
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        if how == "plain":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        else:
            memwrap.wrap(model, rank=config.hidden_size // 32, granularity=4)
            opt = memwrap.optimizer(model, lr=1e-5, compile_step=how.endswith("+cs"))
        fwd = torch.compile(model) if compiled else model
        runs[how] = (model, fwd, opt, {"forward": [], "backward": [], "optimizer": [], "step": [], "peak": []})
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    for _ in range(steps):
        for _, fwd, opt, times in runs.values():
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            marks = [time.perf_counter()]
            loss = fwd(input_ids=ids, labels=ids).loss
            _sync(device)
            marks.append(time.perf_counter())
            loss.backward()
            del loss
            _sync(device)
            marks.append(time.perf_counter())
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            marks.append(time.perf_counter())
            for phase, a, b in zip(("forward", "backward", "optimizer"), marks, marks[1:], strict=False):
                times[phase].append(b - a)
            times["step"].append(marks[-1] - marks[0])
            times["peak"].append(_peak(device))
    med = {how: {k: statistics.median(v[2:]) for k, v in r[3].items()} for how, r in runs.items()}
    params = sum(p.numel() for p in runs["plain"][0].parameters())
    p = med["plain"]
    peak = peak_tflops()
    for how in med:
        t = med[how]
        tflops = 6 * params * batch * seq / t["step"] / 1e12
        print(f"{name:<22}{how:<9}{t['step'] * 1e3:>9.1f}{t['forward'] * 1e3:>9.1f}{t['backward'] * 1e3:>9.1f}"
              f"{t['optimizer'] * 1e3:>9.1f}{batch * seq / t['step']:>10.0f}"
              f"{(f'{tflops / peak:.1%}' if peak else '-'):>7}{t['peak'] / 1e9:>9.2f}")
    for how in ("memwrap", "memwrap+cs"):
        m = med[how]
        peak_ratio = f"{m['peak'] / p['peak']:>8.2f}x" if p["peak"] else f"{'-':>9}"
        print(f"{'':<22}{'ratio ' + ('cs' if how.endswith('cs') else ''):<9}{m['step'] / p['step']:>8.2f}x"
              f"{m['forward'] / p['forward']:>8.2f}x{m['backward'] / p['backward']:>8.2f}x"
              f"{m['optimizer'] / p['optimizer']:>8.2f}x{'':>17}{peak_ratio}")
    del runs
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="llama-2-7b@24,qwen1.5-moe-a2.7b@40,llama-2-7b@plain")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--speed", action="store_true", help="plain vs memwrap step time on the speed shapes")
    ap.add_argument("--shapes", default="tinyllama-1.1b,qwen3-moe-64x,llama-small-compiled",
                    help=f"with --speed: which of {', '.join(SPEED_SHAPES)}")
    ap.add_argument("--device", default="cuda", help="with --speed: 'cpu' dry-runs the code paths (tiny shapes)")
    args = ap.parse_args()
    header = (f"{'shape':<22}{'run':<9}{'step ms':>9}{'fwd ms':>9}{'bwd ms':>9}{'opt ms':>9}{'tok/s':>10}{'MFU':>7}"
              f"{'peak GB':>9}")
    if args.speed and args.device == "cpu":
        print(f"CPU dry run, torch {torch.__version__}, memwrap {memwrap.__version__} (times are not a GPU's)")
        print(header)
        for name in args.shapes.split(","):
            speed(name, max(args.steps, 5), torch.device("cpu"))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU; on a CPU use `memwrap plan MODEL --budget-gb N --simulate`.")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, memwrap {memwrap.__version__}")
    if args.speed:
        print(header)
        for name in args.shapes.split(","):
            speed(name, max(args.steps, 5), torch.device("cuda"))
        return
    for spec in args.runs.split(","):
        run(spec, args.batch_size, args.seq_len, args.steps)


if __name__ == "__main__":
    main()
