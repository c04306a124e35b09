"""Training quality over long runs: held-out loss of memwrap variants as a ratio to a tuned AdamW, with seed spread.

    python tools/quality.py --stage screen                 # every variant, 600 steps, seed 0 (about 30 min on 1 core)
    python tools/quality.py --stage screen2                # a second round the screen pointed at (1/16, 1/32)
    python tools/quality.py --stage final                  # the finalists, 2000 steps, seeds 0 1 2
    python tools/quality.py --report                       # table + plot from the stored runs, no training

Workload (1) of tools/compare.py: a tiny Llama trained from scratch on Shakespeare (byte tokens), the same data,
initial weights and projection seed for every method of one seed, stepped in lockstep, constant learning rate. The
held-out loss is evaluated every 100 steps, so a 2000-step run also gives the 600-step point (the lr has no decay
schedule that would make step 600 of a 2000-step run differ from a 600-step run).

The reference is a tuned AdamW: its lr swept over 5e-4, 1e-3 and 2e-3, the best one (lowest mean held-out loss over
the seeds, at each horizon) is the reference. A variant's ratio is the mean over seeds of (its loss / the reference's
loss on the same seed), ± half the spread (max − min) over seeds.

Variants are settings of one entry each (VARIANTS), never a copy of the loop: compression, optimizer kind, refresh
interval τ, learning-rate scale of the compressed layers, first moment carried or reset at a refresh, error feedback,
and the rank allocated per layer at equal total bytes. Every run is stored in docs/results/quality-runs.json (keyed by
variant, seed and steps) so stages add up and --report needs no training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (tools/compare.py: workloads, lockstep loop, byte measurements)

import memwrap  # noqa: E402

ROOT = compare.ROOT
RUNS = os.environ.get("QUALITY_RUNS") or os.path.join(ROOT, "docs", "results", "quality-runs.json")
LR = 2e-3  # workload (1)'s learning rate (compare.py); every entry here sets its own
ATTN, MLP = 4 * 128 * 128, 3 * 128 * 384  # weight elements per block of the workload's Llama (q k v o; gate up down)


@dataclass(frozen=True)
class Variant:
    """One memwrap setting (or an AdamW reference): everything else as in the default."""

    name: str
    fraction: object = 1 / 8  # c·r / m, or a function (LayerPlan, layer index, layers) -> fraction
    kind: str = "adamw"  # memwrap.optimizer kind: "adamw" (subspace AdamW, the planner's default) or "projfactor"
    tau: int = 100  # refresh_every
    lr_scale: float = 1.0  # the compressed layers' lr × this (the rest of the model keeps the base lr)
    carry: bool = True  # first moment carried into the new subspace at a refresh (False: reset to zero)
    error_feedback: bool = False
    lr: float = 1e-3  # the whole model's learning rate
    adamw_lr: float | None = None  # set: this entry is plain AdamW at that lr (a reference)
    warmup: tuple[float, int] | None = None  # (fraction, steps): train at that coarser compression first, then rewrap
    tau_schedule: tuple[int, ...] = ()  # steps at which P is redrawn (a growing τ), instead of every `tau`
    schedule: str = "constant"  # the lr over the run: "constant" or "cosine" (to 10% of the peak at the last step)
    weights: str = "keep"  # the wrapped weights in their dtype, or 8-bit ("int8", "fp8": wrap(weights=...))
    stochastic_rounding: bool = True  # False: nearest rounding of the merge (the 8-bit ablation)
    note: str = ""


def per_part(attn: float, mlp: float):
    return lambda lp, i, n: attn if lp.name.split(".")[-1].endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else mlp


def per_depth(early: float, late: float):
    return lambda lp, i, n: early if i < n // 2 else late


def at_rank(fraction: float, rank: int):
    """c·r = fraction·m with the rank r fixed (granularity c = fraction·m / r): VLoRP's granularity axis."""
    return lambda lp, i, n: (max(1, round(lp.in_features * fraction / rank)), rank)


def equal_bytes_mlp(attn: float, total: float = 1 / 8) -> float:
    """The MLP fraction that keeps the block's compressed bytes at `total` with attention at `attn`."""
    return (total * (ATTN + MLP) - attn * ATTN) / MLP


VARIANTS = {v.name: v for v in [
    *[Variant(f"adamw-lr{lr:g}", adamw_lr=lr, note=f"AdamW lr {lr:g}") for lr in (5e-4, 1e-3, 2e-3)],
    Variant("1/8", note="default: subspace AdamW, τ100, lr 1e-3"),
    Variant("1/8-lr2e-3", lr=2e-3),
    Variant("1/16", fraction=1 / 16),
    Variant("1/32", fraction=1 / 32),
    Variant("pf-1/8", kind="projfactor", note="ProjFactor"),
    Variant("pf-1/8-lr2e-3", kind="projfactor", lr=2e-3, note="ProjFactor"),
    *[Variant(f"1/8-τ{t}", tau=t, note=f"refresh every {t}") for t in (25, 200, 500)],
    *[Variant(f"1/32-τ{t}", fraction=1 / 32, tau=t, note=f"refresh every {t}") for t in (25, 500)],
    Variant("1/8-lr×√2", lr_scale=math.sqrt(2), note="compressed layers' lr ∝ sqrt(m/(c·r)), relative to 1/4"),
    Variant("1/32-lr×2", fraction=1 / 32, lr_scale=2.0, note="compressed layers' lr ∝ sqrt(m/(c·r)), rel. to 1/8"),
    Variant("1/8-reset", carry=False, note="first moment reset at each refresh"),
    Variant("1/8-ef", error_feedback=True, note="error feedback (GradLite), +4 B per weight element"),
    Variant("1/8-attn-fine", fraction=per_part(1 / 16, equal_bytes_mlp(1 / 16)),
            note="attention 1/16, MLP coarser, equal bytes"),
    Variant("1/8-mlp-fine", fraction=per_part(1 / 4, equal_bytes_mlp(1 / 4)),
            note="attention 1/4, MLP finer, equal bytes"),
    Variant("1/8-early-fine", fraction=per_depth(1 / 16, 3 / 16), note="blocks 0-1 at 1/16, 2-3 at 3/16"),
    Variant("1/8-late-fine", fraction=per_depth(3 / 16, 1 / 16), note="blocks 0-1 at 3/16, 2-3 at 1/16"),
    # second round, after the screen: what might bring 1/16 and 1/32 closer
    Variant("1/16-lr×0.7", fraction=1 / 16, lr_scale=0.7, note="compressed layers at 0.7× the lr"),
    Variant("1/16-τ200", fraction=1 / 16, tau=200, note="refresh every 200"),
    Variant("1/16-r4", fraction=at_rank(1 / 16, 4), note="rank 4, twice the blocks (c·r the same)"),
    Variant("1/16-r2", fraction=at_rank(1 / 16, 2), note="rank 2, four times the blocks"),
    Variant("1/32-r2", fraction=at_rank(1 / 32, 2), note="rank 2, twice the blocks"),
    # third round: a growing refresh interval, a warm-up at coarser compression
    Variant("1/8-τ-grow", tau_schedule=tuple(25 * (2 ** k - 1) for k in range(1, 8)),
            note="P redrawn after 25, 75, 175, 375, 775, 1575 steps (τ doubles from 25)"),
    Variant("1/8-warm-1/4", warmup=(1 / 4, 100), note="1/4 for 100 steps, then 1/8 (moments of the rest kept)"),
    Variant("1/16-warm-1/4", fraction=1 / 16, warmup=(1 / 4, 100), note="1/4 for 100 steps, then 1/16"),
    # the final round: AdamW's best lr moves to 5e-4 by step 2000, so memwrap gets it too
    *[Variant(f"{k}-lr5e-4", fraction=1 / int(k[2:]), lr=5e-4, note="lr 5e-4") for k in ("1/8", "1/16", "1/32")],
    # issue 17's refresh sweep at the coarsest level: 1/4 × τ 25 / 100 / 200 / 500
    *[Variant(f"1/4-τ{t}" if t != 100 else "1/4", fraction=1 / 4, tau=t, note=f"refresh every {t}")
      for t in (25, 100, 200, 500)],
    # the lr decayed by a cosine for every method, AdamW's lr tuned again under it (the reference of these rows)
    *[Variant(f"cos-adamw-lr{lr:g}", adamw_lr=lr, schedule="cosine", note=f"AdamW lr {lr:g}, cosine")
      for lr in (5e-4, 1e-3, 2e-3)],
    *[Variant(f"cos-{k}", fraction=1 / int(k[2:]), schedule="cosine", note="cosine from lr 1e-3")
      for k in ("1/8", "1/16", "1/32")],
    *[Variant(f"cos-{k}-lr2e-3", fraction=1 / int(k[2:]), lr=2e-3, schedule="cosine", note="cosine from lr 2e-3")
      for k in ("1/8", "1/16", "1/32")],
    # 8-bit base weights (docs/quality.md, 8-bit weights): int8 and fp8 e4m3, stochastic and nearest rounding
    Variant("1/8-int8", weights="int8", note="int8 weights, a float32 scale per 128 inputs"),
    Variant("1/8-fp8", weights="fp8", note="fp8 (e4m3) weights, a float32 scale per 128 inputs"),
    Variant("1/8-int8-nearest", weights="int8", stochastic_rounding=False, note="int8 weights, nearest rounding"),
    Variant("1/8-fp8-nearest", weights="fp8", stochastic_rounding=False, note="fp8 weights, nearest rounding"),
]}
SECOND = ("1/16-lr×0.7", "1/16-τ200", "1/16-r4", "1/16-r2", "1/32-r2")
THIRD = ("1/8-τ-grow", "1/8-warm-1/4", "1/16-warm-1/4")
STAGES = {
    "screen": dict(steps=600, seeds=(0,), variants=tuple(v for v in list(VARIANTS)[:25] if v not in SECOND)),
    "screen2": dict(steps=600, seeds=(0,), variants=SECOND),
    "screen3": dict(steps=600, seeds=(0,), variants=THIRD),
    "final": dict(steps=2000, seeds=(0, 1, 2),
                  variants=("adamw-lr0.0005", "adamw-lr0.001", "adamw-lr0.002", "1/8", "1/16", "1/32", "pf-1/8",
                            "1/8-lr5e-4", "1/16-lr5e-4", "1/32-lr5e-4")),
    "tau-1/4": dict(steps=600, seeds=(0,), variants=("1/4-τ25", "1/4", "1/4-τ200", "1/4-τ500")),
    "cosine": dict(steps=2000, seeds=(0,),
                   variants=("cos-adamw-lr0.0005", "cos-adamw-lr0.001", "cos-adamw-lr0.002", "cos-1/8", "cos-1/16",
                             "cos-1/32")),
}


def cosine_lr(run: compare.Run, step: int, steps: int) -> None:
    """After step `step`: every param group's lr for the next step, on a cosine from its initial lr to 10% of it."""
    scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    for group in run.opt.param_groups:
        group.setdefault("peak_lr", group["lr"])
        group["lr"] = group["peak_lr"] * scale


def method(v: Variant, seed: int) -> compare.Method:
    if v.adamw_lr is not None:
        return compare.Method(v.name, compare.adamw, lr_scale=v.adamw_lr / LR, note=v.note)
    scale = v.lr / LR

    def build_opt(model, lr):
        opt = memwrap.optimizer(model, lr=lr, kind=v.kind, error_feedback=v.error_feedback)
        for group in opt.param_groups:
            if group.get("compressed"):
                group["lr"] = lr * v.lr_scale
        return opt
    start = v.warmup[0] if v.warmup else v.fraction
    return compare.Method(v.name, build_opt, setup=compare.memwrap_at(start, v.tau, seed=seed, weights=v.weights,
                                                                     stochastic_rounding=v.stochastic_rounding),
                          note=v.note, lr_scale=scale)


def grow_tau(run: compare.Run, schedule: tuple[int, ...]) -> None:
    """The growing-τ variant: every wrapped layer's refresh index becomes the number of schedule steps passed."""
    import bisect
    import types

    from memwrap.compress.merge import units_of

    for unit in units_of(run.model):
        unit.index_at = types.MethodType(lambda unit, steps: bisect.bisect_right(schedule, steps), unit)


def rewrap(run: compare.Run, v: Variant, seed: int) -> None:
    """End of a warm-up: merge is done (coords are zero after every step), so unwrap, wrap at the target compression
    and build the optimizer again; the other parameters keep their AdamW moments and step counts."""
    from memwrap.compress.merge import layers_by_coords

    coords = set(layers_by_coords())
    kept = {p: st for p, st in run.opt.state.items() if id(p) not in coords}
    memwrap.unwrap(run.model)
    compare.memwrap_at(v.fraction, v.tau, seed=seed)(run.model)
    run.opt = run.method.optimizer(run.model, LR * run.method.lr_scale)
    for p, st in kept.items():
        run.opt.state[p] = st


def reset_at_refresh(run: compare.Run) -> None:
    """The 'reset' variant: zero the first moment of every compressed layer whose P was just redrawn."""
    from memwrap.compress import merge

    seen = run.__dict__.setdefault("refresh_seen", {})
    by_id = merge.layers_by_coords()
    for group in run.opt.param_groups:
        for p in group["params"] if group.get("compressed") else ():
            module = by_id[id(p)]
            if seen.get(id(p), 0) != module.refresh_index and "exp_avg" in run.opt.state[p]:
                run.opt.state[p]["exp_avg"].zero_()
            seen[id(p)] = module.refresh_index


def train(names: list[str], steps: int, seed: int) -> dict:
    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", "1")))
    work = compare.WORKLOADS["shakespeare"]()
    work.eval_every = 100
    variants = [VARIANTS[n] for n in names]
    by_name = {v.name: v for v in variants}

    def after(run):
        v, step = by_name[run.method.name], len(run.losses) + 1
        if not v.carry:
            reset_at_refresh(run)
        if v.tau_schedule and step == 1:
            grow_tau(run, v.tau_schedule)
        if v.warmup and step == v.warmup[1]:
            rewrap(run, v, seed)
        if v.schedule == "cosine":
            cosine_lr(run, step, steps)
    runs = compare.train_all([method(v, seed) for v in variants], work, steps=steps, lr=LR, device="cpu",
                             seed=seed, after_step=after, log_every=100)
    return {r.method.name: {"heldout": {str(k): round(v, 5) for k, v in r.heldout.items()},
                            "grad_state_bytes": r.grads + r.states,
                            "seconds_per_step": sum(r.seconds[1:]) / max(1, len(r.seconds) - 1)} for r in runs}


def load_runs() -> dict:
    return json.load(open(RUNS)) if os.path.exists(RUNS) else {}


def store(new: dict, steps: int, seed: int) -> None:
    """Add runs to RUNS (under a lock: several stages may run at once)."""
    import fcntl

    with open(RUNS + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = load_runs()
        for name, result in new.items():
            runs[f"{name}|seed{seed}|{steps}"] = result
        with open(RUNS + ".tmp", "w") as f:
            json.dump(dict(sorted(runs.items())), f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(RUNS + ".tmp", RUNS)


def results_at(runs: dict, horizon: int) -> dict[str, dict[int, tuple[float, int]]]:
    """{variant: {seed: (held-out loss at `horizon`, grad+state bytes)}}, the longest run that reached it."""
    out: dict = {}
    for key, result in sorted(runs.items(), key=lambda kv: int(kv[0].rsplit("|", 1)[1])):
        name, seed, steps = key.split("|")
        if name in VARIANTS and VARIANTS[name].schedule != "constant" and int(steps) != horizon:
            continue  # a decaying lr: step 600 of a 2000-step run is not the end of a 600-step run
        if str(horizon) in result["heldout"]:
            out.setdefault(name, {})[int(seed[4:])] = (result["heldout"][str(horizon)], result["grad_state_bytes"])
    return out


def schedule_of(name: str) -> str:
    return VARIANTS[name].schedule if name in VARIANTS else "constant"


def report(horizon: int, runs: dict, schedule: str = "constant") -> tuple[str, dict]:
    """The table at one horizon: each variant's ratio to the tuned AdamW (mean ± half-spread over common seeds), the
    variants and AdamW runs of one lr schedule."""
    res = {n: r for n, r in results_at(runs, horizon).items() if schedule_of(n) == schedule}
    refs = {n: r for n, r in res.items() if n in VARIANTS and VARIANTS[n].adamw_lr is not None}
    if not refs:
        return f"(no AdamW run reached step {horizon})", {}
    seeds = set.intersection(*(set(r) for r in refs.values()))
    best = min(refs, key=lambda n: sum(refs[n][s][0] for s in seeds) / len(seeds))
    ref, ref_bytes = refs[best], refs[best][min(seeds)][1]
    lines = [f"step {horizon}, {schedule} lr: reference {best} (AdamW lr swept over {', '.join(sorted(refs))}), "
             f"held-out loss {sum(ref[s][0] for s in seeds) / len(seeds):.4f} over seeds {sorted(seeds)}",
             f"{'variant':<16}{'ratio':>8}{'±':>7}{'seeds':>6}{'grad+state':>11}  note", "-" * 80]
    table = {}
    for name, by_seed in sorted(res.items(), key=lambda kv: _mean_ratio(kv[1], ref)):
        common = sorted(set(by_seed) & set(ref))
        if not common:
            continue
        ratios = [by_seed[s][0] / ref[s][0] for s in common]
        mean, half = sum(ratios) / len(ratios), (max(ratios) - min(ratios)) / 2
        table[name] = {"ratio": round(mean, 4), "spread": round(half, 4), "seeds": len(common),
                       "bytes_ratio": round(by_seed[common[0]][1] / ref_bytes, 4)}
        note = VARIANTS[name].note if name in VARIANTS else ""
        lines.append(f"{name:<16}{mean:>7.4f}×{half:>7.4f}{len(common):>6}{by_seed[common[0]][1] / ref_bytes:>10.3f}×"
                     f"  {note}")
    return "\n".join(lines), table


def _mean_ratio(by_seed, ref):
    common = set(by_seed) & set(ref)
    return sum(by_seed[s][0] / ref[s][0] for s in common) / len(common) if common else math.inf


def plot(tables: dict[int, dict], out: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 5), squeeze=False)
    for ax, (horizon, table) in zip(axes[0], sorted(tables.items())):
        for name, row in table.items():
            ax.errorbar(row["bytes_ratio"], row["ratio"], yerr=row["spread"], fmt="o", ms=4)
            ax.annotate(name, (row["bytes_ratio"], row["ratio"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="gradient + optimizer-state bytes / AdamW's", ylabel="held-out loss / tuned AdamW",
               title=f"tiny Llama from scratch, step {horizon}")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


EIGHT_BIT = ("int8", "fp8", "int8-nearest", "fp8-nearest")  # variants "1/8-<format>" against "1/8", at EIGHT_BIT_STEPS
EIGHT_BIT_STEPS = 600


def eight_bit(runs: dict, steps: int = EIGHT_BIT_STEPS) -> dict:
    """Held-out loss of 8-bit weights over the same run with the weights kept (1/8, the same seeds) at `steps`: mean
    ratio, half the spread over seeds and the seeds, per format (the planner's weights='auto' reads "int8", "fp8")."""
    res = results_at(runs, steps)
    base = res.get("1/8", {})
    out = {}
    for fmt in EIGHT_BIT:
        by_seed = res.get(f"1/8-{fmt}", {})
        common = sorted(set(by_seed) & set(base))
        if common:
            ratios = [by_seed[s][0] / base[s][0] for s in common]
            out[fmt] = [round(sum(ratios) / len(ratios), 4), round((max(ratios) - min(ratios)) / 2, 4), len(common)]
    return out


PUBLISHED = ("1/8", "1/16", "1/32", "pf-1/8")  # the default optimizer at three compressions, and ProjFactor
MARK_BEGIN, MARK_END = "<!-- quality table: tools/quality.py --publish -->", "<!-- end of quality table -->"


def publish(tables: dict[int, dict], commands: list[str]) -> list[str]:
    """memwrap/planning/quality.json (the planner's quality curve) and the table in docs/quality.md, from the runs."""
    from memwrap.planning.planner import QUALITY_FILE

    curve = {str(h): {n: [t[n]["ratio"], t[n]["spread"]] for n in PUBLISHED if n in t and not n.startswith("pf-")}
             for h, t in sorted(tables.items()) if t}
    seeds = min((t[n]["seeds"] for t in tables.values() for n in PUBLISHED if n in t), default=0)
    data = {"workload": "tiny Llama (4 layers, hidden 128) from scratch on Shakespeare bytes: tools/compare.py (1)",
            "reference": "AdamW, lr tuned over 5e-4, 1e-3, 2e-3 (the best mean per horizon)",
            "optimizer": f"memwrap.optimizer default ({VARIANTS['1/8'].kind}), τ {VARIANTS['1/8'].tau}, "
                         f"lr {VARIANTS['1/8'].lr:g}",
            "seeds": seeds, "commands": commands, "heldout_loss_ratio": curve,
            "weights_8bit": eight_bit(load_runs())}
    with open(QUALITY_FILE, "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    rows = ["| compression | " + " | ".join(f"step {h}" for h in sorted(tables)) + " | grad + state bytes |",
            "|---|" + "---|" * len(tables) + "---|"]
    for name in PUBLISHED:
        cells = []
        for h in sorted(tables):
            row = tables[h].get(name)
            cells.append(f"{row['ratio']:.3f}× ± {row['spread']:.3f}" if row else "—")
        first = next((tables[h][name] for h in sorted(tables) if name in tables[h]), None)
        label = name.replace("pf-", "ProjFactor ") if name.startswith("pf-") else f"{name} (default optimizer)"
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {first['bytes_ratio']:.3f}× |" if first else "")
    doc = os.path.join(ROOT, "docs", "quality.md")
    text = open(doc, encoding="utf-8").read()
    start, end = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
    with open(doc, "w", encoding="utf-8") as f:
        f.write(text[:start] + "\n" + "\n".join(r for r in rows if r) + "\n" + text[end:])
    return [QUALITY_FILE, doc]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=sorted(STAGES))
    ap.add_argument("--variants", help="comma-separated, instead of the stage's; from: " + ", ".join(VARIANTS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seeds", help="comma-separated seeds")
    ap.add_argument("--report", action="store_true", help="only print the tables of the stored runs")
    ap.add_argument("--horizons", default="600,2000")
    ap.add_argument("--publish", action="store_true",
                    help="write the planner's quality curve (memwrap/planning/quality.json) and docs/quality.md's table")
    args = ap.parse_args()
    if not args.report:
        stage = STAGES[args.stage or "screen"]
        names = args.variants.split(",") if args.variants else list(stage["variants"])
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        steps = args.steps or stage["steps"]
        seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else stage["seeds"]
        for seed in seeds:
            store(train(names, steps, seed), steps, seed)
    runs = load_runs()
    tables = {}
    for horizon in (int(h) for h in args.horizons.split(",")):
        text, tables[horizon] = report(horizon, runs)
        print("\n" + text)
        text, cosine = report(horizon, runs, "cosine")
        if cosine:
            print("\n" + text)
    for steps in (EIGHT_BIT_STEPS // 2, EIGHT_BIT_STEPS):
        rows = eight_bit(runs, steps)
        if rows:
            print(f"\nstep {steps}: 8-bit weights, held-out loss over the same seed's 1/8 run with the weights kept")
            for fmt, (mean, half, seeds) in rows.items():
                print(f"1/8-{fmt:<16}{mean:>7.4f}×{half:>7.4f}{seeds:>6}")
    path = plot({h: t for h, t in tables.items() if t}, os.path.join(ROOT, "docs", "results", "quality.png"))
    if path:
        print("saved", os.path.relpath(path, ROOT))
    if args.publish:
        commands = ["python tools/quality.py --stage screen", "python tools/quality.py --stage final",
                    "python tools/quality.py --variants 1/8,1/8-int8,1/8-fp8,1/8-int8-nearest,1/8-fp8-nearest "
                    "--steps 600 --seeds 0,1,2",
                    "python tools/quality.py --report --publish"]
        for written in publish(tables, commands):
            print("wrote", os.path.relpath(written, ROOT))


if __name__ == "__main__":
    main()
