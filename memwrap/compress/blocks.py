"""Whole-layer activation savings: what a transformer block keeps for backward besides its linear inputs.

Every saving here recomputes a region in backward instead of keeping its intermediates, through PyTorch's own
non-reentrant `torch.utils.checkpoint` (RNG state preserved), so losses and gradients are bit-identical to plain
training; what changes is only what stays alive between forward and backward:

    norm       an RMSNorm written in Python ops (fp32 copy, rstd, normed output kept) -> its input only
    act        the MLP's element-wise part: act(gate)·up (SwiGLU/GeGLU, fused gate/up, MoE experts) keeps gate and
               up only, not the activation output and the gated product; a Python-op GELU (GPT-2) keeps its input
    mlp        (option "recompute") the whole MLP -> its input only (two or three more matmuls in backward)
    attention  (option "recompute") the attention module -> its input only (q/k/v and attention again in backward)
    layer      (per layer) the whole decoder layer -> its input only (gradient checkpointing of chosen layers)

Installed by setting `forward` on the module instances the adapter names (an instance attribute: the class and
every other instance are untouched); `restore` deletes it. Each replacement is checked once, at wrap time, to give
the very same output as the module's own forward on a random input; a module that does not is left as it is.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidSettingsError
from .attention import FORMATS, RouteSDPA
from .elementwise import ActFn, act_kind, gated_act, norm_mode, probe, rms_norm
from .kernel_scope import KernelScope, install_nested, unrouted_forward
from .kernel_scope import restore as restore_scoped

SAVINGS_ATTR = "_memwrap_saving"  # on a module whose forward memwrap replaced: the kind ("norm", "act", ...)
FORMULA_ATTR = "_memwrap_formula"  # on fused experts: the act(gate)·up formula their forward uses (or None)


def recompute(fn, *args, **kwargs):
    """fn(*args, **kwargs), keeping only the inputs for backward when autograd records this forward."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def _own_forward(module: nn.Module):
    """The class's forward bound to this instance (a partial: older dynamo cannot trace `function.__get__`)."""
    return functools.partial(type(module).forward, module)


class SavingForward:
    """The replacement `forward` of one module instance (picklable: it holds the module, the kind and the formula
    found at wrap time, no bound method). `formula` names the hand-written backward the module matches
    (elementwise.norm_mode / act_kind); None recomputes the module's own ops in backward instead (checkpoint)."""

    def __init__(self, module: nn.Module, kind: str, formula: str | None = None):
        self.module, self.kind, self.formula = module, kind, formula
        if kind == "whole":  # kernels' routing of the region's modules, written outside the recomputed region
            self.scope, self.inner = KernelScope(list(module.modules())), unrouted_forward(module)

    @property
    def __signature__(self) -> inspect.Signature:  # callers that inspect forward see the module's own parameters
        return inspect.signature(_own_forward(self.module))

    def __call__(self, *args, **kwargs):
        m, formula = self.module, self.__dict__.get("formula")
        if self.kind == "whole":  # the module's own forward, recomputed in backward
            args, kwargs = _without_cache(args, kwargs)
            scope = self.__dict__.get("scope")
            if scope:  # see kernel_scope: the recomputed body finds its routing active and writes nothing
                return scope.run(recompute, functools.partial(scope.run, self.inner, m), *args, **kwargs)
            return recompute(_own_forward(m), *args, **kwargs)
        if self.kind in FORMATS:  # attention whose SDPA keeps 8-bit q, k, v
            with RouteSDPA(self.kind):
                return _own_forward(m)(*args, **kwargs)
        if self.kind in ("norm", "act"):  # an RMSNorm, or an activation written in Python ops (GPT-2's GELU):
            # the Function below fp32 (bit-exact there); fp32 recomputes the module's own ops (see elementwise)
            if formula and len(args) == 1 and not kwargs and args[0].dtype != torch.float32:
                if self.kind == "norm":
                    return rms_norm(m, args[0], formula)
                return ActFn.apply(args[0], _own_forward(m), formula)
            return recompute(_own_forward(m), *args, **kwargs)
        if self.kind == "gated":  # LlamaMLP and kin: down(act(gate(x)) * up(x))
            (x,) = args
            gate, up = m.gate_proj(x), m.up_proj(x)
            h = gated_act(m.act_fn, formula, gate, up) if formula else recompute(_gated, m.act_fn, gate, up)
            return m.down_proj(h)
        if self.kind == "fused-gated":  # Phi-3: gate and up in one projection
            (x,) = args
            gate_up = m.gate_up_proj(x)
            h = gated_act(m.activation_fn, formula, gate_up) if formula else recompute(_fused_gated,
                                                                                         m.activation_fn, gate_up)
            return m.down_proj(h)
        raise AssertionError(self.kind)


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A recomputed attention or layer must not write a KV cache twice, nor keep it alive (transformers' own
    checkpointing passes no cache the same way): anything that acts as a cache becomes None, positional or not."""
    if not torch.is_grad_enabled():
        return args, kwargs
    args = tuple(None if hasattr(a, "get_seq_length") else a for a in args)
    out = dict(kwargs)
    for key, value in kwargs.items():  # past_key_values, cache, layer_past: anything that acts as a KV cache
        if hasattr(value, "get_seq_length") or key in ("past_key_values", "past_key_value", "layer_past"):
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return args, out


def _gated(act, gate, up):
    return act(gate) * up


def _fused_gated(act, gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return up * act(gate)


# ---- what to replace ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Saving:
    """One module whose forward memwrap replaces: its qualified name and the kind of replacement."""

    name: str
    kind: str  # "norm" | "act" | "gated" | "fused-gated" | "whole" | "experts-act" | "int8" | "fp8"
    part: str  # "norm" | "mlp" | "attention" | "layer" | "act"


def _is_python_rms_norm(module: nn.Module) -> bool:
    """An RMSNorm implemented with Python tensor ops (HF's), which keeps an fp32 copy and its output for backward."""
    return "rmsnorm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), nn.Parameter)


def _mlp_kind(module: nn.Module) -> str | None:
    if all(isinstance(getattr(module, a, None), nn.Module) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return "gated"
    if all(isinstance(getattr(module, a, None), nn.Module) for a in ("gate_up_proj", "down_proj", "activation_fn")) \
            and isinstance(module.gate_up_proj, nn.Linear):
        return "fused-gated"
    return None


def _python_gelu(module: nn.Module) -> bool:
    """An activation module of Python ops (GPT-2's NewGELUActivation keeps several intermediates)."""
    return type(module).__name__ in ("NewGELUActivation", "GELUTanh", "FastGELUActivation", "QuickGELUActivation",
                                     "GELUPytorchTanh") or type(module).__name__.endswith("NewGELUActivation")


def find_savings(model: nn.Module, adapter, *, norms: str = "recompute", mlp: str = "act", attention: str = "keep",
                 checkpoint_layers=()) -> list[Saving]:
    """The replacements these options ask for, by the adapter's names of norms, MLPs and attention modules."""
    parts = adapter.parts(model)
    out: list[Saving] = []
    layers = set(layer_names(model, checkpoint_layers))
    inside_layer = lambda name: any(name.startswith(p + ".") for p in layers)  # noqa: E731
    for name in layers:
        out.append(Saving(name, "whole", "layer"))
    # Inside a checkpointed layer the element-wise savings stay (they keep its recomputation small, nested in it);
    # recomputing its MLP or attention once more would only cost time.
    if norms == "recompute":
        for name in parts["norm"]:
            if _is_python_rms_norm(model.get_submodule(name)):
                out.append(Saving(name, "norm", "norm"))
    if attention == "recompute":
        out += [Saving(n, "whole", "attention") for n in parts["attention"] if not inside_layer(n)]
    elif attention in FORMATS:  # SDPA keeps 8-bit q, k, v
        out += [Saving(n, attention, "attention") for n in parts["attention"] if not inside_layer(n)]
    for name in parts["mlp"]:
        module = model.get_submodule(name)
        if mlp == "recompute" and not inside_layer(name):
            out.append(Saving(name, "whole", "mlp"))
            continue
        if mlp == "act" or (mlp == "recompute" and inside_layer(name)):
            kind = _mlp_kind(module)
            if kind is not None:
                out.append(Saving(name, kind, "mlp"))
            experts = getattr(module, "experts", None)
            if isinstance(experts, nn.Module) and hasattr(experts, "_apply_gate"):  # fused experts: memwrap's forward
                out.append(Saving(f"{name}.experts", "experts-act", "mlp"))
            for sub_name, sub in module.named_modules():  # a shared expert MLP inside an MoE block; GPT-2's act
                full = f"{name}.{sub_name}"
                if sub_name and _mlp_kind(sub) is not None and kind is None:
                    out.append(Saving(full, _mlp_kind(sub), "mlp"))
                elif sub_name and _python_gelu(sub):
                    out.append(Saving(full, "act", "act"))
    return out


def check_options(model: nn.Module, savings: dict) -> None:
    """InvalidSettingsError for options this model cannot take (checked before anything changes)."""
    layer_names(model, savings.get("checkpoint_layers", ()))
    attention = savings.get("attention", "keep")
    if attention in FORMATS:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl != "sdpa":
            raise InvalidSettingsError(
                f"attention={attention!r} stores SDPA's inputs in 8 bits, but this model uses attn_implementation="
                f"{impl!r}; load it with attn_implementation='sdpa', or use attention='recompute' (exact).")
        if attention == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            raise InvalidSettingsError("attention='fp8' needs torch.float8_e4m3fn (torch >= 2.1); use 'int8'.")


def layer_names(model: nn.Module, which) -> list[str]:
    """Qualified names of the decoder (or encoder) layers `which` selects: "all" or layer indices."""
    if not which:
        return []
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.endswith(("layers", "layer", ".h"))]
    if not stacks:
        raise InvalidSettingsError(f"checkpoint_layers={which!r}: {type(model).__name__} has no stack of layers memwrap "
                                   "knows (a ModuleList named layers, layer or h); leave checkpoint_layers empty.")
    stack_name, stack = max(stacks, key=lambda nm: len(nm[1]))
    if which == "all":
        return [f"{stack_name}.{i}" for i in range(len(stack))]
    outside = [i for i in which if not 0 <= i < len(stack)]
    if outside:
        raise InvalidSettingsError(f"checkpoint_layers {outside} are not layers of {stack_name!r}, which has "
                                   f"{len(stack)} (0 to {len(stack) - 1}).")
    return [f"{stack_name}.{i}" for i in which]


# ---- install / restore ------------------------------------------------------------------------------------
def _formula(module: nn.Module, kind: str) -> str | None:
    """The hand-written backward a module matches (see elementwise), or None to recompute its own ops instead."""
    param = next(module.parameters(), None)
    if kind == "norm":
        return norm_mode(module)
    if kind == "act":  # a Python-op activation: its output stays its own; the derivative is the closed form's
        return act_kind(_own_forward(module), torch.zeros((), dtype=torch.float32), exact=False)
    if kind in ("gated", "fused-gated") and param is not None:
        return act_kind(module.act_fn if kind == "gated" else module.activation_fn, param)
    if kind == "experts-act" and param is not None:
        return _experts_gate_formula(module, param)
    return None


def _experts_gate_formula(experts: nn.Module, like: torch.Tensor) -> str | None:
    """Fused experts whose `_apply_gate` is act(gate)·up on the halves of gate_up (transformers' default)."""
    kind = act_kind(experts.act_fn, like) if experts.has_gate and hasattr(experts, "act_fn") else None
    if kind is None:
        return None
    gate_up = probe((7, 16), like, seed=1)
    with torch.no_grad():
        try:
            same = torch.equal(experts._apply_gate(gate_up), gated_act(experts.act_fn, kind, gate_up))
        except (TypeError, RuntimeError, ValueError):
            return None
    return kind if same else None


def _check_same_output(module: nn.Module, forward: SavingForward, kind: str) -> bool:
    """The replacement gives the module's own output, bit for bit, on a random input (MLPs; a norm's and an
    activation's formula were matched on their own)."""
    if kind not in ("gated", "fused-gated"):
        return True
    first = module.gate_proj if kind == "gated" else module.gate_up_proj
    width = first.in_features if isinstance(first, nn.Linear) else first.weight.shape[-1]
    param = next(module.parameters())
    if param.device.type == "meta":
        return True
    x = probe((3, width), param)
    with torch.no_grad():
        try:
            return torch.equal(_own_forward(module)(x), forward(x))
        except (TypeError, RuntimeError, ValueError):
            return False


def install(model: nn.Module, savings: list[Saving]) -> list[Saving]:
    """Replace each module's forward (instance attribute); returns what was installed (checked ones only)."""
    done = []
    for s in savings:
        module = model.get_submodule(s.name)
        if SAVINGS_ATTR in module.__dict__:
            continue
        formula = _formula(module, s.kind)
        if s.kind == "experts-act":  # memwrap's experts forward recomputes act(gate)·up when it sees the mark
            object.__setattr__(module, SAVINGS_ATTR, s.part)
            object.__setattr__(module, FORMULA_ATTR, formula)
            done.append(s)
            continue
        forward = SavingForward(module, s.kind, formula)
        if not _check_same_output(module, forward, s.kind):
            continue
        module.forward = forward
        object.__setattr__(module, SAVINGS_ATTR, s.part)
        if s.kind == "whole":
            install_nested(module)
        done.append(s)
    return done


def restore(model: nn.Module) -> int:
    """Remove every replacement: each module runs its class's forward again. Returns how many."""
    count = 0
    for module in model.modules():
        if SAVINGS_ATTR in module.__dict__:
            if isinstance(module.__dict__.get("forward"), SavingForward):
                del module.forward
            object.__delattr__(module, SAVINGS_ATTR)
            module.__dict__.pop(FORMULA_ATTR, None)
            count += 1
    restore_scoped(model)
    return count


def installed(model: nn.Module) -> dict[str, str]:
    """Qualified module name -> the part whose saving is installed there."""
    return {n: m.__dict__[SAVINGS_ATTR] for n, m in model.named_modules() if SAVINGS_ATTR in m.__dict__}
