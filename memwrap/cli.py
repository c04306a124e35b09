"""The `memwrap` command line: demo, plan, env."""

from __future__ import annotations

import json
import sys

import click

from .errors import MemwrapError


def _fail(message: str) -> None:
    """One line on stderr, exit code 2, no traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memwrap")
def main() -> None:
    """memwrap: full-parameter training in a fraction of the memory."""


@main.command()
@click.option("--steps", default=40, show_default=True, type=click.IntRange(min=1), help="training steps per run")
def demo(steps: int) -> None:
    """Train a small Llama-shaped model on Shakespeare with and without memwrap; print loss and memory."""
    from .demo import run_demo

    try:
        run_demo(steps=steps)
    except MemwrapError as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _unit(n: float) -> tuple[str, float]:
    """The largest of GB/MB/KB that keeps n at least 1."""
    return next(((u, sc) for u, sc in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if n >= sc), ("B", 1.0))


def _gb(n: int | float | None, scale: float = 1e9) -> str:
    return "-" if n is None else f"{n / scale:.2f}"


def plan_report(model: str, plan, baselines: dict) -> dict:
    """The data `memwrap plan --json` prints: the plan, memwrap's parts beside the AdamW baselines."""
    return {
        "model": model,
        "budget_bytes": plan.budget_bytes,
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "dtype": plan.dtype,
        "memwrap": dict(plan.memory),
        "step_time_overhead": plan.step_time_overhead,
        "recompute": plan.savings,
        "optimizer": plan.optimizer,
        "weights": plan.weights,
        "baselines": {k: dict(v.parts) | {"peak": v.peak_bytes} for k, v in baselines.items()},
        "plan": plan.to_dict(),
    }


def format_table(model: str, plan, baselines: dict) -> str:
    """Breakdown (GB) of memwrap beside plain AdamW and AdamW + checkpointing, then per-layer-kind settings."""
    cols = list(baselines) + ["memwrap"]
    parts = [k for k, _ in plan.memory if k != "peak"]
    data = {k: dict(v.parts) | {"peak": v.peak_bytes} for k, v in baselines.items()}
    data["memwrap"] = dict(plan.memory)
    unit, scale = _unit(min(data[c]["peak"] for c in cols))
    lines = [f"{model}: batch {plan.batch_size} × seq_len {plan.seq_len}, {plan.dtype}, "
             f"budget {_gb(plan.budget_bytes, scale)} {unit}", ""]
    head = f"{unit:<20}" + "".join(f"{c:>12}" for c in cols)
    lines += [head, "-" * len(head)]
    reserved = [k for k in ("cuda context", "allocator headroom") if k in data["memwrap"]]
    for c in cols:  # the card holds the peak and, on a GPU, the reserves (memwrap.planning.card)
        if reserved:
            from .planning import card

            data[c].setdefault("cuda context", data["memwrap"]["cuda context"])
            data[c].setdefault("allocator headroom", int(data[c]["peak"] * card.headroom_fraction()))
        data[c]["on the card"] = data[c]["peak"] + sum(data[c].get(k, 0) for k in reserved)
    parts = [k for k in parts if k not in reserved]
    for part in parts + ["peak"] + reserved + (["on the card"] if reserved else []):
        lines.append(f"{part:<20}" + "".join(f"{_gb(data[c].get(part), scale):>12}" for c in cols))
    fits = ["yes" if data[c]["on the card"] <= (plan.budget_bytes or 0) else "no" for c in cols]
    lines.append(f"{'fits budget':<20}" + "".join(f"{f:>12}" for f in fits))
    plain = next((c for c in baselines if data[c]["on the card"] <= (plan.budget_bytes or 0)), None)
    if plain is not None:
        lines.append(f"note: {'plain AdamW' if plain == 'AdamW' else 'AdamW with gradient checkpointing'} fits this "
                     f"budget without memwrap (peak {_gb(data[plain]['peak'], scale)} {unit}); memwrap's plan leaves "
                     f"{_gb((plan.budget_bytes or 0) - data['memwrap']['on the card'], scale)} {unit} free for a larger batch "
                     "or longer sequences, at a small loss cost (docs/results)")
    lines += ["", f"{'layer kind':<28}{'count':>6}{'E':>5}{'n×m':>14}{'c':>6}{'r':>5}{'c·r/m':>9}"]
    kinds: dict[tuple, int] = {}
    for lp in plan.layers:
        key = (lp.name.split(".")[-1], lp.kind, lp.num_experts, lp.out_features, lp.in_features, lp.c, lp.r)
        kinds[key] = kinds.get(key, 0) + 1
    for (leaf, _kind, e, n, m, c, r), count in kinds.items():
        lines.append(f"{leaf:<28}{count:>6}{e:>5}{f'{n}×{m}':>14}{c:>6}{r:>5}{c * r / m:>9.4f}")
    which = plan.checkpoint_layers
    layers = "all" if which == "all" else (f"{len(which)} ({', '.join(map(str, which[:6]))}{' ...' if len(which) > 6 else ''})"
                                           if which else "none")
    lines.append("")
    lines.append(f"norms: {plan.norms}, mlp: {plan.mlp}, attention: {plan.attention}, checkpointed layers: {layers}, "
                 f"chunked loss: {plan.loss_chunk or 'off'}, optimizer: {plan.optimizer or '-'}, weights: {plan.weights}")
    if plan.step_time_overhead is not None:
        lines.append(f"predicted step time: +{plan.step_time_overhead:.0%} over plain training (recomputed FLOPs)")
    if plan.skipped:
        lines.append(f"left exact: {len(plan.skipped)} weights (e.g. {plan.skipped[0][0]}: {plan.skipped[0][1]})")
    lines.extend(plan.notes)
    return "\n".join(lines)


@main.command("plan")
@click.argument("model")
@click.option("--budget-gb", type=str, default=None, help="memory budget in GB (default: free GPU memory via NVML, else RAM)")
@click.option("--batch-size", type=str, default=None, help="sequences per step (default 8)")
@click.option("--seq-len", type=str, default=None, help="tokens per sequence (default min(2048, the model's max))")
@click.option("--dtype", type=str, default="bf16", show_default=True, help="weights and activations: fp32, bf16, fp16")
@click.option("--json", "as_json", is_flag=True, help="print JSON (for scripts)")
@click.option("--save", "save_path", type=click.Path(dir_okay=False), default=None,
              help="write the plan; memwrap.wrap(model, plan=PATH) applies it exactly")
@click.option("--compress-experts/--no-compress-experts", default=None,
              help="preview with fused MoE experts compressed or exact (default: what this memwrap does)")
@click.option("--zero", type=click.Choice(["1", "2", "3"]), default=None,
              help="DeepSpeed ZeRO stage: the budget is one rank's, DeepSpeed's partitioned bytes are counted")
@click.option("--world-size", type=str, default=None, help="ranks DeepSpeed partitions over (with --zero; default 1)")
@click.option("--offload-optimizer", is_flag=True, help="ZeRO-Offload: optimizer states in CPU memory (with --zero)")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="where the run trains: on cuda the budget also holds the CUDA context and allocator headroom")
@click.option("--weights", type=click.Choice(["keep", "int8", "fp8", "auto"]), default="keep", show_default=True,
              help="the compressed weights in their dtype, in 8 bits (int8, fp8), or 8 bits only where the budget "
                   "needs them (auto)")
@click.option("--simulate", "simulate_steps", type=click.IntRange(min=1), default=None, is_flag=False, flag_value=3,
              help="also run N training steps of the plan on fake tensors (memwrap.simulate; default 3) and print "
                   "the peak allocated bytes after each phase")
def plan_cmd(model: str, budget_gb: str | None, batch_size: str | None, seq_len: str | None, dtype: str,
             as_json: bool, save_path: str | None, compress_experts: bool | None, zero: str | None,
             world_size: str | None, offload_optimizer: bool, device: str, weights: str,
             simulate_steps: int | None) -> None:
    """Choose settings for MODEL (a bundled name, a local directory or a hub id) without loading any weights."""
    from .errors import BudgetTooSmallError
    from .planning import planner
    from .planning.estimate import dtype_from_name

    def number(name: str, text: str | None, kind):
        if text is None:
            return None
        try:
            value = kind(text)
        except ValueError:
            _fail(f"{name} must be a {'whole number' if kind is int else 'number'}, got {text!r}.")
        if not value > 0:
            _fail(f"{name} must be positive, got {text!r}.")
        return value

    budget = number("--budget-gb", budget_gb, float)
    batch = number("--batch-size", batch_size, int)
    seq = number("--seq-len", seq_len, int)
    ranks = number("--world-size", world_size, int)
    if (ranks is not None or offload_optimizer) and zero is None:
        _fail("--world-size and --offload-optimizer describe DeepSpeed ZeRO: add --zero 1, 2 or 3.")
    try:
        dtype_bytes = dtype_from_name(dtype)[1]
        zero_kw = dict(zero=int(zero) if zero else None, world_size=ranks, offload_optimizer=offload_optimizer)
        spec = planner.zero_spec(**zero_kw)
        the_plan = planner.plan(model, budget_gb=budget, batch_size=batch, seq_len=seq, dtype=dtype,
                                compress_experts=compress_experts, device=device, weights=weights, **zero_kw)
        sk = planner.sketch(model, compress_experts=compress_experts)
        base = planner.baselines(sk, batch_size=the_plan.batch_size, seq_len=the_plan.seq_len, dtype_bytes=dtype_bytes,
                                 zero=spec)
    except BudgetTooSmallError as e:
        _fail(str(e))
    except MemwrapError as e:
        _fail(str(e).splitlines()[0])
    if save_path:
        try:
            the_plan.save(save_path)
        except OSError as e:
            _fail(f"cannot write {save_path}: {e}")
    simulated = None
    if simulate_steps:
        if spec is not None:
            _fail("--simulate runs one process's step; it does not model DeepSpeed ZeRO: leave out --zero.")
        from .api import simulate

        try:
            simulated = simulate(model, the_plan, steps=simulate_steps, dtype=dtype)
        except MemwrapError as e:
            _fail(str(e).splitlines()[0])
    if as_json:
        report = plan_report(model, the_plan, base)
        if simulated is not None:
            report["simulated"] = {"steps": simulated.steps, "peak": simulated.peak}
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_table(model, the_plan, base))
        if simulated is not None:
            predicted = dict(the_plan.memory).get("peak", 0)
            click.echo(f"\nsimulated on fake tensors ({simulate_steps} steps; allocated bytes, as "
                       "torch.cuda.max_memory_allocated reads them after each phase):")
            click.echo(simulated.table())
            if predicted:
                click.echo(f"predicted peak {predicted / 1e9:.3f} GB; simulated / predicted {simulated.peak / predicted:.3f}")
        if save_path:
            click.echo(f"plan saved to {save_path}; apply it with memwrap.wrap(model, plan={save_path!r})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def env(as_json: bool) -> None:
    """Versions, devices, NVML free/total and RAM: what a bug report needs."""
    from .planning.memory import environment

    info = environment()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            click.echo(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
