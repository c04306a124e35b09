"""Find the layers to compress, check everything, then swap modules. Nothing is mutated until all checks pass."""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import resolve
from ..config import LayerPlan, Plan, WrapConfig
from ..errors import (
    AlreadyWrappedError,
    InvalidSettingsError,
    NoTargetsError,
    NotWrappedError,
    PlanMismatchError,
    UnsupportedArchitectureError,
)
from . import blocks, experts, loss, merge, quant
from .base import InputGroup, PreForwardCheck
from .linear import CompressedLinear

STATE_ATTR = "_memwrap_state"
PRECHECK_ATTR = "_memwrap_precheck"  # the handle of the wrapped model's PreForwardCheck hook
QUANT_MARKERS = ("4bit", "8bit", "int8", "int4", "fp8", "quant", "qlinear", "gptq", "awq")


@dataclass
class Candidate:
    """A weight memwrap can compress: a linear layer, or one fused expert parameter of E experts."""

    name: str
    module: nn.Module
    in_features: int  # m
    out_features: int  # n
    group_key: str
    dtype: torch.dtype
    kind: str = "linear"  # "linear" | "experts"
    num_experts: int = 1


def name_matches(name: str, patterns) -> bool:
    """A pattern matches a qualified name as a glob (of the whole name or of its tail), or as a substring."""
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, "*." + pat):
                return True
        elif pat in name:
            return True
    return False


def tied_parameter_ids(model: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, k in counts.items() if k > 1}


def is_wrapped(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None or any(
        isinstance(m, CompressedLinear) or hasattr(m, experts.UNITS_ATTR) for m in model.modules())


def find_targets(model: nn.Module, config: WrapConfig, adapter, *,
                 allow_meta: bool = False) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """(candidates, skipped) for plain nn.Linear layers; skipped holds (name, reason) for linears left exact."""
    check_supported(model, config)
    tied = tied_parameter_ids(model)
    out: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    quantized: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if experts.is_fused_experts(module):
            out.extend(_experts_candidates(name, module, config, skipped))
            continue
        unknown = experts.unknown_expert_weights(module)
        if unknown and config.exclude and name_matches(name, config.exclude):
            skipped.append((name, f"expert weights {[n for n, _ in unknown]} excluded by the user: trained exactly"))
        elif unknown:
            raise UnsupportedArchitectureError(
                f"{type(module).__name__} at {name!r} keeps expert weights {unknown} in a layout memwrap does not know "
                f"(not a transformers `@use_experts_implementation` experts class). memwrap will not leave them exact "
                f"silently: pass exclude=[..., {name!r}] to train them exactly on purpose, or convert the model to a "
                f"transformers version with fused experts.")
        if is_conv1d(module) and not (config.exclude and name_matches(name, config.exclude)) \
                and (config.targets is None or name_matches(name, config.targets)):
            if module.weight.requires_grad and id(module.weight) not in tied:
                out.append(Candidate(name, module, module.weight.shape[0], module.weight.shape[1],
                                     adapter.sibling_key(name, module), module.weight.dtype))
            else:
                skipped.append((name, "weight is frozen or tied"))
            continue
        if not isinstance(module, nn.Linear):
            continue
        if config.exclude and name_matches(name, config.exclude):
            continue
        if config.targets is not None and not name_matches(name, config.targets):
            continue
        cls = type(module).__name__
        weight = getattr(module, "weight", None)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if adapter.is_router(name, module, parent):
            skipped.append((name, "MoE router: kept exact"))
            continue
        if weight is None or not isinstance(weight, torch.Tensor):
            skipped.append((name, f"{cls} has no weight tensor"))
        elif kind := quantized_kind(module, weight):
            quantized.append((name, kind))
        elif type(module) is not nn.Linear:
            skipped.append((name, f"{cls} subclasses nn.Linear with its own forward; left exact"))
        elif not weight.requires_grad:
            skipped.append((name, "weight is frozen (requires_grad=False)"))
        elif id(weight) in tied:
            skipped.append((name, "weight is tied to another module (e.g. embeddings)"))
        elif weight.device.type == "meta" and not allow_meta:  # the planner enumerates meta models on purpose
            skipped.append((name, "weight is on the meta device; load the weights first"))
        else:
            out.append(Candidate(name, module, module.in_features, module.out_features,
                                 adapter.sibling_key(name, module), weight.dtype))
    if quantized:
        kinds = sorted({k for _, k in quantized})
        raise UnsupportedArchitectureError(
            f"{len(quantized)} linear layers are quantized ({', '.join(kinds)}; e.g. {quantized[0][0]!r}): memwrap "
            "trains full-precision weights and cannot update quantized ones, so they would silently stay as they are. "
            "Load the model in bf16 or fp32 to fine-tune it fully with memwrap, or train adapters on the quantized "
            "model (QLoRA with peft); to keep these layers frozen on purpose, pass exclude=[...] with their names.")
    if config.head == "compress":  # the output head, even where the default exclude names it
        head = head_candidate(model, adapter, allow_meta=allow_meta)
        if head is not None and all(c.module is not head.module for c in out):
            out.append(head)
    elif config.head == "exact":
        out = [c for c in out if c.module is not loss.output_head(model)]
    return out, skipped


def quantized_kind(module: nn.Module, weight: torch.Tensor) -> str | None:
    """What makes a linear layer quantized (bitsandbytes, GPTQ/AWQ classes, integer or 8-bit weights, torchao's
    tensor subclasses), or None for a float layer."""
    cls = type(module).__name__
    if any(mark in cls.lower() for mark in QUANT_MARKERS) or hasattr(weight, "quant_state"):
        return cls
    if not weight.is_floating_point() or weight.dtype.itemsize < 2:
        return f"{cls} with {weight.dtype} weights"
    if type(weight) not in (torch.Tensor, nn.Parameter) and getattr(weight, "placements", None) is None:
        return f"{cls} with {type(weight).__name__} weights"  # torchao: a tensor subclass in a plain nn.Linear
    return None


def check_supported(model: nn.Module, config: WrapConfig) -> None:
    """UnsupportedArchitectureError, before anything changes, for models memwrap cannot train correctly: PEFT
    adapters already attached, parameters already partitioned by DeepSpeed ZeRO-3, and layers used under two names
    (wrap would replace only one of the uses)."""
    partitioned = next((n for n, p in model.named_parameters() if hasattr(p, "ds_id")), None)
    if partitioned is not None:
        raise UnsupportedArchitectureError(
            f"this model's parameters are already partitioned by DeepSpeed ZeRO-3 ({partitioned!r} is a shard): it was "
            "built under deepspeed.zero.Init, which transformers does when TrainingArguments(deepspeed=<a stage-3 "
            "config>) exist before the model is built. memwrap wraps whole layers: build and wrap the model first, "
            "then create the TrainingArguments (or call deepspeed.initialize); ZeRO-3 then partitions the wrapped "
            "model and memwrap merges each step into every rank's shard.")
    peft = [(n, type(m).__name__) for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if peft or getattr(model, "peft_config", None) is not None:
        where = f" ({peft[0][1]} at {peft[0][0]!r})" if peft else ""
        raise UnsupportedArchitectureError(
            f"this model has PEFT adapters attached{where}: memwrap trains the full weights itself and would compress "
            "the adapters instead. Merge them first and unfreeze the merged weights (model = model.merge_and_unload(); "
            "model.requires_grad_(True)), then wrap, or train the adapters with PEFT alone.")
    uses: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear) or experts.is_fused_experts(module) or is_conv1d(module):
            uses.setdefault(id(module), []).append(name)
    targeted = lambda n: not (config.exclude and name_matches(n, config.exclude)) and (  # noqa: E731
        config.targets is None or name_matches(n, config.targets))
    for names in uses.values():
        if len(names) > 1 and any(targeted(n) for n in names):
            raise UnsupportedArchitectureError(
                f"one layer is used at both {names[0]!r} and {names[1]!r} (a shared layer): wrap replaces a layer by "
                "its name, so the other use would keep the original, frozen weight and silently stop training. Give "
                "each use its own layer, or pass exclude=[...] with all its names to train it exactly.")


def head_candidate(model: nn.Module, adapter, *, allow_meta: bool = False) -> Candidate | None:
    """The causal LM's output head as a candidate (wrap's default exclude leaves it out): a plain, trainable,
    untied nn.Linear; None otherwise (tied to the embeddings, subclassed, quantized, frozen, absent)."""
    head = loss.output_head(model)
    if type(head) is not nn.Linear:
        return None
    w = head.weight
    if not w.requires_grad or id(w) in tied_parameter_ids(model) or not w.is_floating_point() \
            or w.dtype.itemsize < 2 or (w.device.type == "meta" and not allow_meta):
        return None
    name = next((n for n, m in model.named_modules() if m is head and n), None)
    if name is None:
        return None
    return Candidate(name, head, head.in_features, head.out_features, adapter.sibling_key(name, head), w.dtype)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2-style Conv1D: y = x W + b with W stored (in, out)."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), nn.Parameter) \
        and module.weight.ndim == 2 and module.weight.is_floating_point()


def _experts_candidates(name: str, module: nn.Module, config: WrapConfig, skipped) -> list[Candidate]:
    """Both fused weights of an experts module, or neither (filters apply to the module's name)."""
    if config.exclude and name_matches(name, config.exclude):
        return []
    pnames = experts.fused_params(module)
    full = [f"{name}.{p}" for p in pnames]
    if config.targets is not None and not any(name_matches(n, config.targets) for n in [name] + full):
        return []
    if experts.expert_parallel(module):
        raise UnsupportedArchitectureError(f"{type(module).__name__} at {name!r} runs with expert parallelism, which "
                                           "memwrap does not support yet; wrap the model before distributing experts.")
    weights = [getattr(module, p) for p in pnames]
    if not all(w.requires_grad and w.is_floating_point() for w in weights):
        skipped.append((name, "expert weights are frozen or not floating point"))
        return []
    out = []
    for pname, full_name, w in zip(pnames, full, weights):
        e, n, m = experts.expert_shape(module, pname)
        out.append(Candidate(full_name, module, m, n, full_name, w.dtype, kind="experts", num_experts=e))
    return out


def settings_for(cand: Candidate, rank: int, granularity: int) -> tuple[int, int]:
    """Check (c, r) against one layer; InvalidSettingsError saying what would work."""
    m = cand.in_features
    if m % granularity:
        divisors = [k for k in range(1, min(m, 64) + 1) if m % k == 0]
        raise InvalidSettingsError(
            f"granularity {granularity} does not divide in_features={m} of {cand.name!r}; "
            f"use a divisor of every target's in_features (for this layer: {divisors}), or leave granularity=None.")
    d = m // granularity
    if rank > d:
        raise InvalidSettingsError(
            f"rank {rank} exceeds the block width d = in_features / granularity = {m}/{granularity} = {d} of "
            f"{cand.name!r}; use rank <= {d} or a smaller granularity.")
    return granularity, rank


def fallback_settings(m: int) -> tuple[int, int]:
    """Settings without a planner: c·r ≈ m/64 (saved inputs and gradients at ~1.6%), r between 4 and 16."""
    target = max(4, m // 64)
    best = (1, min(m, target))
    for c in sorted(k for k in range(1, m + 1) if m % k == 0):
        r = target // c
        if 4 <= r <= 16 and r <= m // c:
            best = (c, r)
            if r <= 8:
                break
    return best


def build_plan(model: nn.Module, config: WrapConfig, candidates: list[Candidate], skipped, dtype_bytes: int,
               choose=None) -> Plan:
    """Assign (c, r) per candidate: explicit rank/granularity, `choose(candidate)`, or the fallback."""
    layers = []
    for cand in candidates:
        if config.rank is not None or config.granularity is not None:
            c = config.granularity if config.granularity is not None else 1  # rank alone: whole rows (c = 1)
            r = config.rank if config.rank is not None else min(8, cand.in_features // c)
            c, r = settings_for(cand, r, c)
        elif choose is not None:
            c, r = choose(cand)
        else:
            c, r = fallback_settings(cand.in_features)
        layers.append(LayerPlan(name=cand.name, kind=cand.kind, in_features=cand.in_features,
                                out_features=cand.out_features, c=c, r=r, num_experts=cand.num_experts,
                                group=cand.group_key, dtype_bytes=dtype_bytes))
    return Plan(layers=tuple(layers), projection=config.projection, refresh_every=config.refresh_every,
                seed=config.seed, share_inputs=config.share_inputs, stochastic_rounding=config.stochastic_rounding,
                norms=config.norms, mlp=config.mlp, attention=config.attention, checkpoint_layers=config.checkpoint_layers,
                loss_chunk=config.loss_chunk, weights="keep" if config.weights == "auto" else config.weights,
                skipped=tuple(skipped), model_class=type(model).__name__)


def check_plan_against_model(model: nn.Module, plan: Plan) -> None:
    """PlanMismatchError unless every planned linear exists with the planned shape."""
    modules = dict(model.named_modules())
    for lp in plan.layers:
        if lp.kind == "experts":
            mod_name, _, pname = lp.name.rpartition(".")
            mod = modules.get(mod_name)
            ok = mod is not None and experts.is_fused_experts(mod) and pname in experts.fused_params(mod) \
                and experts.expert_shape(mod, pname) == (lp.num_experts, lp.out_features, lp.in_features)
            if not ok:
                raise PlanMismatchError(f"plan expects fused experts {lp.name!r} of {lp.num_experts}×{lp.out_features}×"
                                        f"{lp.in_features}, which this model ({type(model).__name__}) does not have; "
                                        f"the plan was made for {plan.model_class or 'another model'}.")
        else:
            mod = modules.get(lp.name)
            if mod is None:
                raise PlanMismatchError(f"plan names layer {lp.name!r}, which this model ({type(model).__name__}) does not "
                                        f"have; the plan was made for {plan.model_class or 'another model'}.")
            shape = tuple(mod.weight.shape) if is_conv1d(mod) else (mod.in_features, mod.out_features) \
                if type(mod) is nn.Linear else None
            if shape != (lp.in_features, lp.out_features):
                raise PlanMismatchError(f"plan expects {lp.name!r} to be a Linear {lp.out_features}×{lp.in_features}, "
                                        f"found {mod!r}; make the plan for this model.")
        if lp.in_features % lp.c or not 1 <= lp.r <= lp.in_features // lp.c:
            raise PlanMismatchError(f"plan entry {lp.name!r} has c={lp.c}, r={lp.r}, invalid for in_features={lp.in_features}.")


def apply_plan(model: nn.Module, plan: Plan) -> list[CompressedLinear]:
    """Build every CompressedLinear, then swap them in (the only mutation)."""
    modules = dict(model.named_modules())
    groups: dict[tuple, InputGroup] = {}
    built: list[tuple[str, CompressedLinear]] = []
    units: dict[str, list] = {}
    for lp in plan.layers:
        key = (lp.group if plan.share_inputs and lp.group else lp.name, lp.in_features, lp.c, lp.r)
        group = groups.get(key)
        if group is None:
            group = groups[key] = InputGroup(key[0], lp.in_features, lp.c, lp.r, plan.projection, plan.seed)
        if lp.kind == "experts":
            mod_name, _, pname = lp.name.rpartition(".")
            units.setdefault(mod_name, []).append(experts.ExpertsUnit(
                modules[mod_name], mod_name, pname, lp.c, lp.r, group, refresh_every=plan.refresh_every,
                stochastic_rounding=plan.stochastic_rounding))
            continue
        built.append((lp.name, CompressedLinear(modules[lp.name], lp.name, lp.c, lp.r, group,
                                                refresh_every=plan.refresh_every,
                                                stochastic_rounding=plan.stochastic_rounding)))
    previous_impl = None
    if units:
        experts.register_implementation()
        previous_impl = getattr(model.config, "_experts_implementation", None)
        model.set_experts_implementation(experts.IMPLEMENTATION)
    for name, new in built:
        set_submodule(model, name, new)
        new.weight.requires_grad_(False)
        merge.register(new)
    for mod_name, mod_units in units.items():
        experts.attach(modules[mod_name], mod_units)
        for unit in mod_units:
            merge.register(unit)
    object.__setattr__(model, "_memwrap_previous_experts_impl", previous_impl)
    savings = dict(plan.savings)
    loss_chunk = savings.pop("loss_chunk")
    blocks.install(model, blocks.find_savings(model, resolve(model), **savings))
    loss.install(model, loss_chunk)
    head = loss.output_head(model)
    for _, m in built:
        m.is_head = m is head
    loss.guard_head(model)
    wrapped = [m for _, m in built] + [u for us in units.values() for u in us]
    for unit in wrapped:
        unit.wave_bytes = plan.step_wave_bytes or None
        if plan.weights != "keep" and not unit.is_head:  # the output head keeps its dtype (the chunked loss reads it)
            unit.store_8bit(quant.FORMATS[plan.weights])
    object.__setattr__(model, PRECHECK_ATTR, model.register_forward_pre_hook(PreForwardCheck(wrapped)))
    return wrapped


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def restore_all(model: nn.Module) -> int:
    """Put every original nn.Linear back, with the current (merged) weight and bias. Returns how many."""
    blocks.restore(model)
    loss.remove(model)
    precheck = model.__dict__.pop(PRECHECK_ATTR, None)
    if precheck is not None:
        precheck.remove()
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, CompressedLinear):
            continue
        module.flush()
        module.restore_dtype()
        base = module._memwrap_base
        base.weight = module.weight
        base.bias = module.bias
        base.weight.requires_grad_(module._weight_requires_grad)
        merge.unregister(module)
        set_submodule(model, name, base)
        count += 1
    restored_experts = False
    for module in model.modules():
        for unit in experts.detach(module):
            merge.unregister(unit)
            count += 1
            restored_experts = True
    previous = model.__dict__.pop("_memwrap_previous_experts_impl", None)
    if restored_experts and previous is not None:
        model.set_experts_implementation(previous)
    return count


def require_module(model, verb: str) -> None:
    """InvalidSettingsError unless `model` is an nn.Module (a path or a name is a common slip)."""
    if not isinstance(model, nn.Module):
        hint = " (a path or hub name: load the model first, e.g. AutoModelForCausalLM.from_pretrained(...))" \
            if isinstance(model, str | os.PathLike) else ""
        raise InvalidSettingsError(f"memwrap.{verb} takes the model, a torch.nn.Module; got {type(model).__name__}"
                                   f"{hint}.")


def require_materialized(model: nn.Module) -> None:
    """InvalidSettingsError for a model whose weights are on the meta device (nothing to train yet)."""
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise InvalidSettingsError(
            f"{type(model).__name__} has {len(meta)} parameter(s) on the meta device (e.g. {meta[0]!r}): there are no "
            "weights to train yet. Load or materialize them first (model.to_empty(device=...) and load_state_dict, or "
            "from_pretrained), then wrap; to plan without weights use memwrap.plan(config_or_name, budget_gb=...).")


def require_wrapped(model: nn.Module, verb: str = "wrap"):
    require_module(model, verb)
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise NotWrappedError(f"{type(model).__name__} is not wrapped by memwrap; call memwrap.wrap(model) first.")
    return state


def require_unwrapped(model: nn.Module) -> None:
    require_module(model, "wrap")
    if is_wrapped(model):
        raise AlreadyWrappedError(
            f"{type(model).__name__} is already wrapped by memwrap; call memwrap.unwrap(model) before wrapping it again.")


def no_targets_error(model: nn.Module, config: WrapConfig, skipped) -> NoTargetsError:
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    msg = (f"no layer of {type(model).__name__} matched: {n_linear} nn.Linear modules found, "
           f"targets={list(config.targets) if config.targets is not None else 'all'}, exclude={list(config.exclude)}.")
    if skipped:
        msg += " Left exact: " + "; ".join(f"{n} ({why})" for n, why in skipped[:5]) + "."
    msg += (" Pass targets= with names that exist (e.g. 'q_proj' or 'layers.*.mlp.*') or check that the model has "
            "float linear layers.")
    return NoTargetsError(msg)


@dataclass
class WrapState:
    """Kept on the wrapped model instance (as `model._memwrap_state`); removed by unwrap."""

    plan: Plan
    config: WrapConfig
    modules: list = field(default_factory=list)
    monitor: object = None  # planning.monitor.Monitor when the plan predicts memory


def apply_wrap(model: nn.Module, the_plan: Plan, config: WrapConfig) -> WrapState:
    """Apply a checked plan and mark the model wrapped (wrap's last part; memwrap.simulate's on a meta copy)."""
    blocks.check_options(model, the_plan.savings)  # InvalidSettingsError for options the model cannot take, first
    modules = apply_plan(model, the_plan)
    for unit in merge.units_of(model):
        unit.nonfinite = config.nonfinite
    state = WrapState(plan=the_plan, config=config, modules=modules)
    object.__setattr__(model, STATE_ATTR, state)
    return state
