"""What each block-saving option keeps and costs: family x option -> activation bytes (measured and predicted) vs
plain, step time vs plain AdamW, loss vs plain. Saves a bar plot under tools/out/.

Bytes: everything a training forward leaves alive for backward, measured with a dispatch-mode meter
(memwrap.planning.measure.LiveActivationMeter: it also sees what torch.utils.checkpoint keeps), in bf16 and fp32;
"predicted" is the byte model (memwrap.planning.estimate) for the families it has formulas for. Time: every run
steps once per round, rounds alternate the order, so each ratio sees the same machine load. Loss: after the timed
steps on the same batches; Δloss is against the run with the same gradients (HF ckpt vs plain AdamW, every memwrap
option vs memwrap with linears only): the exact options differ only by rounding (the hand-written norm and
activation backward); the 8-bit attention rows show what their lossy gradients cost.

    python tools/bench_activations.py                 # all families, 12 timed steps each
    python tools/bench_activations.py --steps 4 --families llama
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import memwrap
from memwrap.planning import estimate as est
from memwrap.planning.measure import LiveActivationMeter

OPTIONS = {  # name -> wrap kwargs (None: plain model; "hf-ckpt": plain model + HF gradient checkpointing)
    "plain AdamW": None,
    "HF ckpt (plain)": "hf-ckpt",
    "wrap, 0.1.0 (linears only)": {"norms": "keep", "mlp": "keep"},
    "wrap default (norms, act)": {},
    "+ mlp recompute": {"mlp": "recompute"},
    "+ attention recompute": {"attention": "recompute"},
    "+ mlp and attention": {"mlp": "recompute", "attention": "recompute"},
    "+ every layer ckpt": {"checkpoint_layers": "all"},
    "+ attention int8 (lossy)": {"attention": "int8"},
    "+ attention fp8 (lossy)": {"attention": "fp8"},
    "+ mlp recompute, attn int8": {"mlp": "recompute", "attention": "int8"},
}
MODELED = ("llama", "gpt2", "bert", "qwen3_moe", "mixtral")  # families the byte model has formulas for


def config(family: str):
    from transformers import AutoConfig

    common = dict(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  tie_word_embeddings=False, use_cache=False, max_position_embeddings=512)
    if family == "llama":
        return AutoConfig.for_model("llama", intermediate_size=688, **common)
    if family == "qwen3_moe":
        return AutoConfig.for_model("qwen3_moe", intermediate_size=688, moe_intermediate_size=128, num_experts=8,
                                    num_experts_per_tok=2, head_dim=64, decoder_sparse_step=1, mlp_only_layers=[],
                                    router_aux_loss_coef=0.0, **common)
    if family == "mixtral":
        return AutoConfig.for_model("mixtral", intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                                    router_aux_loss_coef=0.0, **common)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=256, n_embd=256, n_layer=2, n_head=4, n_positions=512,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    if family == "bert":
        return AutoConfig.for_model("bert", vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=1024, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raise ValueError(family)


def build(family: str, option, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(config(family)).to(dtype).train()
    plan = None
    if option == "hf-ckpt":
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif option is not None:
        plan = memwrap.wrap(model, rank=8, granularity=4, **option)
    return model, plan


def measure_bytes(family, option, dtype, ids) -> tuple[int, int | None]:
    plain, _ = build(family, None, dtype)  # the byte model reads the unwrapped weights
    shape, weights = est.ModelShape.from_config(plain.config), est.enumerate_weights(plain)
    del plain
    model, plan = build(family, option, dtype)
    with LiveActivationMeter(model) as meter:
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    predicted = None
    if family in MODELED and option != "hf-ckpt":
        acts = est.saved_activations(shape, weights, plan.layers if plan else None, ids.shape[0], ids.shape[1],
                                     dtype.itemsize, savings=plan.savings if plan else None)
        predicted = sum(v for k, v in acts.items() if not k.startswith("_"))
    return meter.bytes, predicted


def time_and_loss(family, steps, ids_list, dtype=torch.bfloat16) -> dict[str, tuple[float, float]]:
    """Mean step time and the loss after `steps` steps (bf16 weights and activations, how people train; fp32
    Adam states), every option stepped in alternating order."""
    runs = {}
    for name, option in OPTIONS.items():
        model, _ = build(family, option, dtype)
        runs[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3), [], [])
    names = list(runs)
    for step in range(steps + 1):
        ids = ids_list[step % len(ids_list)]
        for name in (names if step % 2 else names[::-1]):
            model, opt, seconds, losses = runs[name]
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:  # the first step is warm-up
                seconds.append(time.perf_counter() - t0)
            losses.append(loss.item())
    return {n: (sum(s) / len(s), losses[-1]) for n, (_, _, s, losses) in runs.items()}


def bundled_predictions(dtype: str = "bf16", batch: int = 8, seq: int = 2048, level: float = 1 / 8) -> str:
    """The byte model at real shapes (nothing loaded): activation bytes of each option vs plain training."""
    from memwrap.planning import planner

    a = est.dtype_from_name(dtype)[1]
    rows = {"linears only": {"norms": "keep", "mlp": "keep"}, "default": {}, "attention int8": {"attention": "int8"},
            "mlp recompute": {"mlp": "recompute"}, "mlp and attention": {"mlp": "recompute", "attention": "recompute"},
            "every layer ckpt": {"checkpoint_layers": "all"}}
    head = f"{'model':<18}{'plain GB':>10}" + "".join(f"{k:>19}" for k in rows)
    kept: list[str] = []
    lines = [f"byte model, {dtype}, batch {batch} × seq_len {seq}, c·r/m = 1/{round(1 / level)}", head, "-" * len(head)]
    for name in ("llama-2-7b", "qwen3-30b-a3b", "mixtral-8x7b"):
        sk = planner.sketch(name)
        layers = planner.layers_at(sk.targets, level, a)
        plain = sum(est.saved_activations(sk.shape, sk.weights, None, batch, seq, a).values())
        cells = []
        for options in rows.values():
            acts = est.saved_activations(sk.shape, sk.weights, layers, batch, seq, a, savings=options)
            cells.append(sum(v for k, v in acts.items() if not k.startswith("_")) / plain)
        lines.append(f"{name:<18}{plain / 1e9:>10.1f}" + "".join(f"{c:>19.3f}" for c in cells))
        if name == "llama-2-7b":  # what the default still keeps, by part, as a fraction of plain
            parts = est.saved_activations(sk.shape, sk.weights, layers, batch, seq, a, savings={})
            kept.append(f"{name} default keeps, of plain: " + ", ".join(
                f"{k} {v / plain:.3f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])
                if v and not k.startswith("_")))
    return "\n".join(lines + kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["llama", "gpt2", "bert", "qwen3_moe", "mixtral"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    ap.add_argument("--predictions-only", action="store_true", help="print the byte model at real shapes and stop")
    args = ap.parse_args()
    if args.predictions_only:
        print(bundled_predictions())
        return
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ids_list = [torch.randint(0, 256, (args.batch_size, args.seq_len), generator=g) for _ in range(3)]
    head = (f"{'family':<10}{'option':<29}{'bf16 bytes':>11}{'ratio':>7}{'pred':>7}{'fp32 ratio':>11}{'pred':>7}"
            f"{'time':>7}{'loss':>10}{'Δloss':>9}")
    print(bundled_predictions() + "\n")
    print(f"batch {args.batch_size} × seq {args.seq_len}, hidden 256, 2 layers; ratios vs plain AdamW; "
          f"time: mean of {args.steps} bf16 steps, alternating\n")
    print(head)
    print("-" * len(head))
    plot = {}
    for family in args.families:
        ratios = {}
        base = {}
        for dtype in (torch.bfloat16, torch.float32):
            base[dtype] = measure_bytes(family, None, dtype, ids_list[0])[0]
        timing = time_and_loss(family, args.steps, ids_list)
        t0, l_plain = timing["plain AdamW"]
        l_wrap = timing["wrap, 0.1.0 (linears only)"][1]
        for name, option in OPTIONS.items():
            l0 = l_plain if option in (None, "hf-ckpt") else l_wrap
            cells = {}
            for dtype in (torch.bfloat16, torch.float32):
                measured, predicted = measure_bytes(family, option, dtype, ids_list[0])
                cells[dtype] = (measured, measured / base[dtype],
                                "-" if predicted is None else f"{predicted / base[dtype]:.3f}")
            seconds, loss = timing[name]
            b16, f32 = cells[torch.bfloat16], cells[torch.float32]
            print(f"{family:<10}{name:<29}{b16[0] / 1e6:>9.2f}MB{b16[1]:>7.3f}{b16[2]:>7}{f32[1]:>11.3f}{f32[2]:>7}"
                  f"{seconds / t0:>7.2f}{loss:>10.4f}{loss - l0:>+9.1e}")
            ratios[name] = b16[1]
        plot[family] = ratios
        print()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(OPTIONS)
    for j, name in enumerate(OPTIONS):
        ax.bar([i + j * width for i in range(len(plot))], [plot[f][name] for f in plot], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(plot))], list(plot))
    ax.set_ylabel("activation bytes vs plain (bf16)")
    ax.legend(fontsize=7)
    path = os.path.join(args.out, "activations.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
