"""Train small Llama-shaped models on Shakespeare side by side: exact AdamW vs memwrap. Used by `memwrap demo`
and tools/bench_train.py.

All runs share one initialisation and one data order and are stepped in lockstep (step i of every run, then
step i + 1), so step-time ratios see the same machine load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..compress.linear import CompressedLinear
from ..planning.measure import SavedTensorMeter, optimizer_state_bytes


@dataclass
class RunSpec:
    """One training run: a name, how to set the model up, how to build its optimizer."""

    name: str
    setup: Callable[[torch.nn.Module], object]  # wraps (or not) the model; returns the Plan or None
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    note: str = ""


@dataclass
class RunResult:
    name: str
    note: str
    train_losses: list = field(default_factory=list)
    heldout: dict = field(default_factory=dict)  # step -> held-out loss
    step_seconds: list = field(default_factory=list)
    saved_activation_bytes: int = 0
    wrapped_grad_opt_bytes: int = 0  # gradients + optimizer state of the compressed (or would-be compressed) weights
    total_grad_opt_bytes: int = 0


def llama_config(hidden: int = 256, layers: int = 4, intermediate: int = 768, heads: int = 4, vocab: int = 256,
                 max_len: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
                       tie_word_embeddings=False)


def build_model(config, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _linear_weight_names(model) -> set[str]:
    """Names of the weights memwrap compresses by default: linears (not lm_head) and fused expert weights."""
    from ..compress.experts import fused_params, is_fused_experts

    names = set()
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear | CompressedLinear) and not n.endswith("lm_head"):
            names.add(n + ".weight")
        elif is_fused_experts(m):
            names.update(f"{n}.{p}" for p in fused_params(m))
    return names


def _grad_opt_bytes(model, optimizer, weight_names: set[str]) -> tuple[int, int]:
    """(bytes for the linear weights memwrap targets, bytes for everything): gradients + optimizer state."""
    params = dict(model.named_parameters())
    wrapped_params = []
    for name, p in params.items():
        owner = name.rsplit(".", 1)[0]
        if name in weight_names and p.requires_grad:
            wrapped_params.append(p)
        elif name.endswith(".coords") and owner + ".weight" in weight_names:
            wrapped_params.append(p)
        elif name.endswith("_memwrap_coords") and name[: -len("_memwrap_coords")] in weight_names:
            wrapped_params.append(p)  # fused experts: <module>.<param>_memwrap_coords
    grads = {id(p): p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None}
    wrapped = sum(grads.get(id(p), 0) for p in wrapped_params) + optimizer_state_bytes(optimizer, wrapped_params)
    total = sum(grads.values()) + optimizer_state_bytes(optimizer)
    return wrapped, total


def _heldout_loss(model, batches) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    model.train(was)
    return loss


def train_side_by_side(specs: list[RunSpec], *, config, steps: int, batch_size: int, seq_len: int,
                       eval_at: tuple[int, ...], eval_batches: int = 8, seed: int = 0, max_chars: int = 3_000_000,
                       log: Callable[[str], None] | None = print, log_every: int = 10) -> list[RunResult]:
    """Train every spec on the same data order from the same init, in lockstep; measure loss, bytes and time."""
    from .corpus import batches, fixed_batches, train_heldout_tokens

    train_tokens, heldout_tokens = train_heldout_tokens(max_chars=max_chars)
    heldout = fixed_batches(heldout_tokens, batch_size, seq_len, eval_batches)
    data = list(batches(train_tokens, batch_size, seq_len, steps, seed=seed))
    runs = []
    for spec in specs:
        model = build_model(config, seed=seed)
        spec.setup(model)
        weight_names = _linear_weight_names(model)
        runs.append((spec, model, spec.make_optimizer(model), weight_names, RunResult(spec.name, spec.note)))
    for _spec, model, _, _, res in runs:  # saved activations of one training forward
        with SavedTensorMeter(model) as meter:
            loss = model(input_ids=data[0], labels=data[0]).loss
        res.saved_activation_bytes = meter.bytes
        del loss
    for step in range(1, steps + 1):
        ids = data[step - 1]
        for _spec, model, opt, weight_names, res in runs:
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 1:
                res.wrapped_grad_opt_bytes, res.total_grad_opt_bytes = 0, 0
            opt.step()
            if step == 1:  # state exists now and grads are still there
                res.wrapped_grad_opt_bytes, res.total_grad_opt_bytes = _grad_opt_bytes(model, opt, weight_names)
            opt.zero_grad(set_to_none=True)
            res.step_seconds.append(time.perf_counter() - t0)
            res.train_losses.append(loss.item())
            if step in eval_at:
                res.heldout[step] = _heldout_loss(model, heldout)
        if log and (step % log_every == 0 or step == steps):
            log(f"step {step:4d}  " + "  ".join(f"{r.name}: {r.train_losses[-1]:.3f}" for *_, r in runs))
    return [r for *_, r in runs]


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def run_demo(steps: int = 40) -> list[RunResult]:
    """`memwrap demo`: a 4-layer Llama-shaped byte-level model on Shakespeare, AdamW vs memwrap (ProjFactor)."""
    import memwrap

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    config = llama_config(hidden=128, layers=4, intermediate=384, heads=4)
    specs = [
        RunSpec("AdamW", lambda m: None, lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3), "exact, full"),
        RunSpec("memwrap", lambda m: memwrap.wrap(m, rank=8, granularity=4),
                lambda m: memwrap.optimizer(m, lr=2e-3), "subspace AdamW, c=4, r=8"),
    ]
    print(f"memwrap demo: Llama-shaped model (4 layers, hidden 128), Shakespeare bytes, {steps} steps, batch 8 x 128\n")
    results = train_side_by_side(specs, config=config, steps=steps, batch_size=8, seq_len=128, eval_at=(steps,),
                                 max_chars=1_000_000)
    base = results[0]
    print(f"\n{'run':<10} {'held-out loss':>13} {'grad+opt (linears)':>19} {'saved activations':>18} {'time/step':>10}")
    for r in results:
        print(f"{r.name:<10} {r.heldout[steps]:>13.3f} {fmt_bytes(r.wrapped_grad_opt_bytes):>19} "
              f"{fmt_bytes(r.saved_activation_bytes):>18} {sum(r.step_seconds) / len(r.step_seconds) * 1e3:>8.0f}ms")
    mw = results[1]
    print(f"\nmemwrap keeps {mw.wrapped_grad_opt_bytes / base.wrapped_grad_opt_bytes:.1%} of AdamW's gradient + optimizer "
          f"bytes for the linear layers and {mw.saved_activation_bytes / base.saved_activation_bytes:.1%} of its saved "
          f"activations; held-out loss {mw.heldout[steps]:.3f} vs {base.heldout[steps]:.3f}.")
    return results


def mean_step_seconds(r: RunResult) -> float:
    """Mean step time, the first (warm-up) step left out."""
    return sum(r.step_seconds[1:]) / max(1, len(r.step_seconds) - 1)


def results_table(results: list[RunResult], eval_at: tuple[int, ...], base: RunResult, *, compressed_label: str,
                  name_width: int = 28) -> str:
    """Held-out losses, loss vs `base`, grad+optimizer bytes (compressed weights and all), saved activations, time."""
    t0 = mean_step_seconds(results[0])
    head = (f"{'run':<{name_width}}" + "".join(f"{f'loss@{s}':>10}" for s in eval_at) + f"{'vs AdamW':>9}"
            f"{compressed_label:>21}{'ratio':>8}{'grad+opt all':>14}{'saved act':>11}{'act ratio':>10}{'time':>7}")
    lines = [head, "-" * len(head)]
    last = eval_at[-1]
    for r in results:
        lines.append(f"{r.name:<{name_width}}" + "".join(f"{r.heldout[s]:>10.3f}" for s in eval_at)
                     + f"{r.heldout[last] / base.heldout[last] - 1:>+9.1%}"
                     + f"{fmt_bytes(r.wrapped_grad_opt_bytes):>21}"
                     + f"{r.wrapped_grad_opt_bytes / base.wrapped_grad_opt_bytes:>8.1%}"
                     + f"{fmt_bytes(r.total_grad_opt_bytes):>14}{fmt_bytes(r.saved_activation_bytes):>11}"
                     + f"{r.saved_activation_bytes / base.saved_activation_bytes:>10.1%}"
                     + f"{mean_step_seconds(r) / t0:>7.2f}")
    return "\n".join(lines)


def plot_losses(results: list[RunResult], path: str, title: str) -> str | None:
    """Smoothed train loss per run, held-out losses as dots; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in results:
        window = [r.train_losses[max(0, i - 10):i + 1] for i in range(len(r.train_losses))]
        (line,) = ax.plot(range(1, len(window) + 1), [sum(w) / len(w) for w in window], label=r.name, lw=1)
        ax.plot(list(r.heldout), list(r.heldout.values()), "o", color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (smoothed); dots: held-out")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
