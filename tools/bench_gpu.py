"""On a CUDA GPU: does `wrap(budget_gb=...)` hold the budget, and where does a step's time go?

    python tools/bench_gpu.py                       # all three runs below
    python tools/bench_gpu.py --runs llama-2-7b@24  # one run: MODEL@BUDGET_GB, or MODEL@plain (AdamW + checkpointing)

Each run builds the model from its bundled config (random weights, bf16, sdpa) on the GPU and trains `--steps` steps
on random tokens (labels = inputs). memwrap runs are wrapped with `wrap(budget_gb=B, batch_size, seq_len)` and trained
under `torch.cuda.set_per_process_memory_fraction(B / total)`, which acts like a card of B GB; "plain" is torch AdamW
(fused) with transformers' gradient checkpointing, uncapped. Printed per run: the plan (its notes), predicted vs
measured max_memory_allocated after each phase of every step (peaks reset at each step's start; predicted = the plan's
simulation), max_memory_reserved, step time, tokens/s, MFU (6 · parameters · tokens / time / the GPU's bf16 dense
peak), and the step-time breakdown (forward / backward / optimizer, medians of steps 2 on).
Default runs: Llama-2-7B at 24 GB (batch 8 × 2048), Qwen1.5-MoE-A2.7B at 40 GB, and Llama-2-7B plain.
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
        plan = memwrap.wrap(model, budget_gb=float(budget), batch_size=batch, seq_len=seq)
        print(f"== {name} at {budget} GB (cap {float(budget) * 1e9 / total:.3f} of {total / 1e9:.1f} GB), "
              f"batch {batch} × {seq}")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="llama-2-7b@24,qwen1.5-moe-a2.7b@40,llama-2-7b@plain")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU; on a CPU use `memwrap plan MODEL --budget-gb N --simulate`.")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, memwrap {memwrap.__version__}")
    for spec in args.runs.split(","):
        run(spec, args.batch_size, args.seq_len, args.steps)


if __name__ == "__main__":
    main()
