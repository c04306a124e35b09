"""Planner benchmark: plans for the bundled configs at 24/40/80 GB, and predicted vs measured bytes on tiny models.

    OMP_NUM_THREADS=1 python tools/bench_planner.py [--batch-size 8 --seq-len 2048 --dtype bf16]

Part 0: the steady-state step, byte model vs simulation (memwrap.simulate), and the settled plan against the budget.
Part 1 (nothing loaded): for each bundled config, the predicted peak of plain AdamW, AdamW + gradient
checkpointing and the memwrap plan at each budget (MoE models twice: fused experts exact and compressed), then the
smallest plan at 1/32 (batch 1 and 8) against the weights and against AdamW + checkpointing.
Part 2: tiny models built from configs: predicted saved-activation bytes vs saved-tensor hooks, and the
predicted peak vs the measured peak RSS growth of two training steps in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

import memwrap
from memwrap.errors import BudgetTooSmallError
from memwrap.planning import estimate as est
from memwrap.planning import planner


def gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def recompute_label(p) -> str:
    which = p.checkpoint_layers
    n = len(p.layers) and max(int(lp.name.split(".")[2]) for lp in p.layers if lp.name.startswith("model.layers.")) + 1
    parts = []
    if which:
        parts.append("ckpt all" if which == "all" else f"ckpt {len(which)}/{n}")
    if p.mlp == "recompute":
        parts.append("mlp")
    if p.attention == "recompute":
        parts.append("attn")
    return "+".join(parts) or "none"


def bundled_table(batch: int, seq: int, dtype: str, budgets=(16, 24, 40, 80)) -> str:
    _, a = est.dtype_from_name(dtype)
    head = (f"{'model':<20}{'experts':<10}{'budget':>7}{'AdamW':>9}{'+ckpt':>9}{'memwrap':>9}"
            f"{'c·r/m':>11}{'head':>6}{'optim':>11}{'recompute':>21}{'loss chunk':>11}{'time':>7}  note")
    lines = [f"bundled configs, batch {batch} × seq_len {seq}, {dtype}; peaks in GB", head, "-" * len(head)]
    for name in est.bundled_names():
        sk0 = planner.sketch(name, compress_experts=False)
        moe = any(w.kind == "experts" for w in sk0.weights)
        for experts in ((False, True) if moe else (None,)):
            sk = planner.sketch(name, compress_experts=bool(experts))
            base = planner.baselines(sk, batch_size=batch, seq_len=seq, dtype_bytes=a)
            label = "-" if experts is None else ("compressed" if experts else "exact")
            for budget in budgets:
                row = f"{name:<20}{label:<10}{budget:>7}{gb(base['AdamW'].peak_bytes):>9}{gb(base['AdamW+ckpt'].peak_bytes):>9}"
                try:
                    p = memwrap.plan(name, budget_gb=budget, batch_size=batch, seq_len=seq, dtype=dtype,
                                     compress_experts=bool(experts))
                    head_c = any(lp.name == "lm_head" for lp in p.layers)
                    row += (f"{gb(dict(p.memory)['peak']):>9}{levels(p):>11}{'yes' if head_c else 'no':>6}"
                            f"{p.optimizer or '-':>11}{recompute_label(p):>21}{p.loss_chunk or 'off':>11}"
                            f"{f'+{p.step_time_overhead:.0%}':>7}")
                except BudgetTooSmallError as e:
                    fit = f"batch {e.max_batch_size} fits" if e.max_batch_size else "no batch fits"
                    row += (f"{'-':>9}{'-':>11}{'-':>6}{'-':>11}{'-':>21}{'-':>11}{'-':>7}  needs {gb(e.min_budget_bytes)} GB;"
                            f" {fit}")
                lines.append(row)
    return "\n".join(lines)


def steady_table(batch: int, seq: int, dtype: str, budgets=(16, 24, 40, 80)) -> str:
    """For each bundled config and budget: the byte model's plan and its simulated steady-state step (how far the sum
    of parts was off), then the settled plan wrap and memwrap.plan return: its peak, the simulated peak (they must
    agree within 2%: the settled peak is the simulation's) and the peak plus the card's reserves against the budget."""
    from memwrap.planning.simulate import run_plan

    head = (f"{'model':<20}{'experts':<10}{'budget':>7}{'byte model':>12}{'simulated':>11}{'off':>8}"
            f"{'settled':>9}{'simulated':>11}{'agree':>7}{'+ reserves':>12}{'fits':>6}{'c·r/m':>11}")
    lines = [f"the steady-state step: byte model vs simulation, batch {batch} × seq_len {seq}, {dtype}; GB", head,
             "-" * len(head)]
    for name in est.bundled_names():
        moe = any(w.kind == "experts" for w in planner.sketch(name, compress_experts=False).weights)
        for experts in ((False, True) if moe else (None,)):
            label = "-" if experts is None else ("compressed" if experts else "exact")
            kw = dict(batch_size=batch, seq_len=seq, dtype=dtype, compress_experts=bool(experts))
            for budget in budgets:
                row = f"{name:<20}{label:<10}{budget:>7}"
                try:
                    raw = memwrap.plan(name, budget_gb=budget, verify=False, **kw)
                    raw_sim = max(run_plan(name, raw, batch_size=batch, seq_len=seq, steps=2, dtype=dtype).steps[-1].values())
                    raw_peak = dict(raw.memory)["peak"]
                    row += f"{gb(raw_peak):>12}{gb(raw_sim):>11}{raw_sim / raw_peak - 1:>+8.1%}"
                except BudgetTooSmallError:
                    row += f"{'-':>12}{'-':>11}{'-':>8}"
                try:
                    p = memwrap.plan(name, budget_gb=budget, **kw)
                    mem = dict(p.memory)
                    sim = max(run_plan(name, p, batch_size=batch, seq_len=seq, steps=2, dtype=dtype).steps[-1].values())
                    total = mem["peak"] + mem.get("cuda context", 0) + mem.get("allocator headroom", 0)
                    row += (f"{gb(mem['peak']):>9}{gb(sim):>11}{sim / mem['peak']:>7.3f}{gb(total):>12}"
                            f"{'yes' if total <= budget * 1e9 else 'NO':>6}{levels(p):>11}")
                except BudgetTooSmallError as e:
                    row += f"{'-':>9}{'-':>11}{'-':>7}{'-':>12}{'-':>6}{'-':>11}  needs {gb(e.min_budget_bytes or 0)} GB"
                lines.append(row)
    return "\n".join(lines)


def levels(p) -> str:
    """The compressions of a plan: one level, or the coarsest-finest pair when layers differ (per-layer rank)."""
    got = sorted({round(lp.in_features / (lp.c * lp.r)) for lp in p.layers})
    return f"1/{got[0]}" if len(got) == 1 else f"1/{got[0]}-1/{got[-1]}"


def floor_table(seq: int, dtype: str, level: float = 1 / 32) -> str:
    """The least peak at a compression (every layer checkpointed, the chunked loss, ProjFactor, lm_head compressed):
    the smallest plan at that level, against the weights and against AdamW + checkpointing."""
    _, a = est.dtype_from_name(dtype)
    head = (f"{'model':<20}{'batch':>6}{'weights':>9}{'AdamW+ckpt':>12}{'least at 1/' + str(round(1 / level)):>15}"
            f"{'÷ weights':>11}{'÷ AdamW+ckpt':>14}")
    lines = [f"the smallest plan at c·r/m = 1/{round(1 / level)}, seq_len {seq}, {dtype}; GB", head, "-" * len(head)]
    for name in est.bundled_names():
        sk = planner.sketch(name)
        weights = sum(w.numel for w in sk.weights) * a
        targets = sk.targets + ([sk.head] if sk.head is not None else [])
        layers = planner.layers_at(targets, level, a)
        savings = dict(norms="recompute", mlp="act", attention="keep", checkpoint_layers="all",
                       loss_chunk=planner.loss_chunk_rows(sk.shape, a))
        for batch in (1, 8):
            least = est.estimate(sk.shape, sk.weights, layers, batch_size=batch, seq_len=seq, dtype_bytes=a,
                                 param_bytes=a, optimizer="projfactor", savings=savings,
                                 coords_bytes=2 if dtype == "bf16" else 4).peak_bytes
            ckpt = planner.baselines(sk, batch_size=batch, seq_len=seq, dtype_bytes=a)["AdamW+ckpt"].peak_bytes
            lines.append(f"{name:<20}{batch:>6}{gb(weights):>9}{gb(ckpt):>12}{gb(least):>15}{least / weights:>11.3f}"
                         f"{least / ckpt:>14.3f}")
    return "\n".join(lines)


def tiny_models():
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, LlamaConfig, Qwen3MoeConfig

    common = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    yield "llama", lambda: AutoModelForCausalLM.from_config(LlamaConfig(
        intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=False, **common))
    yield "qwen3_moe", lambda: AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=False, **common))
    yield "bert", lambda: AutoModelForMaskedLM.from_config(BertConfig(
        intermediate_size=256, attention_probs_dropout_prob=0.0, **common))
    from transformers import GPT2Config, MixtralConfig

    yield "gpt2", lambda: AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=256, attn_pdrop=0.0, bos_token_id=0,
        eos_token_id=0))
    yield "mixtral", lambda: AutoModelForCausalLM.from_config(MixtralConfig(
        intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=2,
        router_aux_loss_coef=0.0, tie_word_embeddings=False, **common))


def saved_table() -> str:
    from memwrap.planning.measure import SavedTensorMeter

    head = f"{'model':<11}{'dtype':<10}{'mode':<9}{'tokens':>7}{'predicted':>12}{'measured':>12}{'error':>8}"
    lines = ["saved activations (bytes): byte model vs saved-tensor hooks", head, "-" * len(head)]
    for name, make in tiny_models():
        for dtype in (torch.float32, torch.bfloat16):
            for mode in ("plain", "memwrap"):
                torch.manual_seed(0)
                model = make().to(dtype).train()
                shape, weights = est.ModelShape.from_config(model.config), est.enumerate_weights(model)
                layers = memwrap.wrap(model, rank=8, granularity=4).layers if mode == "memwrap" else None
                B, T = 4, 128
                ids = torch.randint(0, 512, (B, T))
                with SavedTensorMeter(model) as meter:
                    model(input_ids=ids, labels=ids)
                pred = sum(est.saved_activations(shape, weights, layers, B, T, dtype.itemsize).values())
                lines.append(f"{name:<11}{str(dtype).split('.')[-1]:<10}{mode:<9}{B * T:>7}{pred:>12}{meter.bytes:>12}"
                             f"{pred / meter.bytes - 1:>+8.1%}")
    return "\n".join(lines)


def rss_table() -> str:
    head = f"{'model':<34}{'mode':<9}{'B×T':>9}{'predicted MB':>14}{'measured MB':>13}{'error':>8}"
    lines = ["peak memory of a training step (fresh process, RSS growth, fp32, AdamW): predicted vs measured",
             head, "-" * len(head)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="65536")
    for B, T in ((4, 256), (8, 256)):
        for mode in ("plain", "memwrap"):
            out = subprocess.run([sys.executable, "-m", "memwrap.planning.rss_probe", mode, str(B), str(T)], capture_output=True,
                                 text=True, env=env, timeout=600)
            if out.returncode:
                lines.append(f"llama h512 L4 V8000 {mode}: failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            got = json.loads(out.stdout.strip().splitlines()[-1])
            lines.append(f"{'llama h512 L4 V8000':<34}{mode:<9}{f'{B}×{T}':>9}{got['predicted'] / 1e6:>14.1f}"
                         f"{got['measured'] / 1e6:>13.1f}{got['predicted'] / got['measured'] - 1:>+8.1%}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--skip-measured", action="store_true", help="only the bundled-config tables")
    ap.add_argument("--steady-only", action="store_true", help="only the byte model vs simulation table")
    args = ap.parse_args()
    print(steady_table(args.batch_size, args.seq_len, args.dtype))
    if args.steady_only:
        return
    print()
    print(bundled_table(args.batch_size, args.seq_len, args.dtype))
    print()
    print(floor_table(args.seq_len, args.dtype))
    if not args.skip_measured:
        print()
        print(saved_table())
        print()
        print(rss_table())


if __name__ == "__main__":
    main()
