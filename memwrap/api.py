"""The public verbs: wrap, unwrap, optimizer, sync, report, get_plan, register_first_moment."""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from .compress import inject
from .compress.inject import WrapState  # noqa: F401  (memwrap.api.WrapState, as before)
from .config import Plan, WrapConfig, as_layer_indices
from .errors import InvalidSettingsError


def _as_tuple(value, what: str):
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise InvalidSettingsError(f"{what} must be a string or a list of strings, got {value!r}.") from None
    if not all(isinstance(v, str) for v in items):
        raise InvalidSettingsError(f"{what} must contain only strings, got {value!r}.")
    return items


def _activation_dtype_bytes(model: nn.Module, activation_dtype=None) -> int:
    """Bytes per activation element of the run: the given dtype, else autocast's where wrap is called under
    autocast, else the parameters' dtype."""
    if activation_dtype is not None:
        if isinstance(activation_dtype, torch.dtype):
            return activation_dtype.itemsize
        from .planning.estimate import dtype_from_name

        return dtype_from_name(str(activation_dtype))[1]
    for p in model.parameters():
        if p.is_floating_point():
            dev = p.device.type
            if torch.is_autocast_enabled(dev):
                return torch.get_autocast_dtype(dev).itemsize
            return p.element_size()
    return 4


def wrap(
    model: nn.Module,
    rank: int | None = None,
    granularity: int | None = None,
    *,
    budget_gb: float | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    plan: Plan | str | os.PathLike | None = None,
    targets=None,
    exclude=("lm_head",),
    projection: str = "stiefel",
    refresh_every: int = 100,
    seed: int = 0,
    share_inputs: bool = True,
    stochastic_rounding: bool = True,
    norms: str = "recompute",
    mlp: str = "act",
    attention: str = "keep",
    checkpoint_layers=(),
    loss_chunk: int = 0,
    head: str = "auto",
    activation_dtype=None,
    zero: int | None = None,
    world_size: int | None = None,
    offload_optimizer: bool = False,
    nonfinite: str = "skip",
    weights: str = "keep",
) -> Plan:
    """Compress the model's linear (and MoE expert) layers in place and return the Plan that was applied.

    rank/granularity set r and c for every layer; left out, the planner picks them from the memory budget:
    budget_gb, else free GPU memory via NVML, else torch.cuda.mem_get_info, else free RAM (psutil) on a CPU,
    for batch_size (default 8) × seq_len (default min(2048, the model's max positions)). plan= reapplies a saved
    plan exactly. The model is left untouched when any check fails. activation_dtype ("bf16", torch.bfloat16, ...)
    sizes the activations when training will autocast (default: autocast's dtype if wrap is called under autocast,
    else the parameters' dtype).

    What each block keeps for backward besides linear inputs (every option exact; docs/activations.md):
    norms="recompute" (an RMSNorm keeps only its input) or "keep"; mlp="act" (act(gate)·up recomputed in backward),
    "recompute" (the whole MLP keeps only its input) or "keep"; attention="keep" or "recompute" (the attention
    module keeps only its input); checkpoint_layers: layer indices or "all", recomputed whole in backward;
    loss_chunk: causal LMs compute the cross-entropy this many tokens at a time when called with labels, so the
    N × V logits never exist (the output's logits is then None; without labels they are returned as usual).
    head: the causal LM's untied lm_head: "auto" (compressed only when the budget planner needs it to stay at a
    coarser compression), "exact" (never) or "compress" (always, like every other linear).
    zero (1, 2 or 3), world_size (default: torch.distributed's) and offload_optimizer: the model will train under
    DeepSpeed ZeRO, so the budget is one rank's and the planner counts DeepSpeed's partitioned bytes
    (docs/retrofit.md, DeepSpeed).
    nonfinite: an optimizer step whose gradients of wrapped layers hold inf or NaN is "skip"ped whole (weights and
    optimizer state stay as they were; a RuntimeWarning counts the skips; memwrap.skipped_steps(model)), "raise"s
    NonFiniteError naming the layer, or is taken as is ("ignore"). A GradScaler's own skips stay its own.
    weights: the wrapped layers' frozen W as it is ("keep"), or stored in 8 bits: "int8" (one float32 scale per row and
    block of 128 inputs) or "fp8" (e4m3, the same scales), dequantized one layer at a time in forward and backward and
    updated by unbiased stochastic rounding onto the 8-bit grid; "auto": 8 bits only where the budget planner needs
    them to stay at its quality threshold (docs/how-it-works.md, 8-bit weights). unwrap gives the dequantized weights
    back in their original dtype. The output head keeps its dtype.
    """
    inject.require_unwrapped(model)
    inject.require_materialized(model)
    for key, value in (("stochastic_rounding", stochastic_rounding), ("share_inputs", share_inputs)):
        if not isinstance(value, bool):
            raise InvalidSettingsError(f"{key}={value!r} must be True or False.")
    from .planning import planner

    zero_setting = planner.zero_spec(zero, world_size, offload_optimizer)  # InvalidSettingsError before anything changes
    if activation_dtype is not None:
        _activation_dtype_bytes(model, activation_dtype)  # InvalidSettingsError for an unknown dtype, before anything
    config = WrapConfig(rank=rank, granularity=granularity, projection=projection, refresh_every=refresh_every,
                        seed=seed, targets=_as_tuple(targets, "targets"), exclude=_as_tuple(exclude, "exclude") or (),
                        share_inputs=share_inputs, stochastic_rounding=stochastic_rounding, norms=norms, mlp=mlp,
                        attention=attention, checkpoint_layers=as_layer_indices(checkpoint_layers),
                        loss_chunk=loss_chunk, head=head, nonfinite=nonfinite, weights=weights)
    config.validate()
    planner.refuse_8bit_under_zero(weights, zero_setting)
    _warn_int8_under_old_fsdp2(weights)
    if plan is not None:
        if rank is not None or granularity is not None or budget_gb is not None or config.savings_changed() \
                or head != "auto" or zero_setting is not None or weights != "keep":
            raise InvalidSettingsError("pass either plan= or rank/granularity/budget_gb/norms/mlp/attention/"
                                       "checkpoint_layers/head/zero/weights, not both: a plan fixes every setting.")
        the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        inject.check_plan_against_model(model, the_plan)
    else:
        the_plan = planner.plan_for_model(model, config, budget_gb=budget_gb, batch_size=batch_size, seq_len=seq_len,
                                          dtype_bytes=_activation_dtype_bytes(model, activation_dtype),
                                          zero=zero_setting)
        param = next(model.parameters(), None)
        if param is not None and param.device.type == "cuda":
            the_plan = with_expandable_segments(the_plan)
    return apply(model, the_plan, config)


def with_expandable_segments(the_plan: Plan) -> Plan:
    """A budget plan for a GPU: turn on the CUDA allocator's expandable segments (the headroom the plan reserved
    assumes them) unless the user configured the allocator; the plan's notes say so."""
    from .planning import card

    if the_plan.memory and card.enable_expandable_segments():
        return replace(the_plan, notes=the_plan.notes + (
            "memwrap turned on the CUDA allocator's expandable segments (PYTORCH_CUDA_ALLOC_CONF was unset; "
            "set it to keep your own allocator settings)",))
    return the_plan


def _warn_int8_under_old_fsdp2(weights: str) -> None:
    """int8 weights in a multi-process run on a torch whose FSDP2 cannot shard integer parameters: say so now, not
    through FSDP2's "only Tensors of floating point dtype can require gradients" later (DDP is not affected)."""
    import torch.distributed as dist

    from .compress import quant

    if weights == "int8" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
            and not quant.fsdp2_shards_integer_params():
        import warnings

        warnings.warn(f"memwrap: torch {torch.__version__}'s FSDP2 (fully_shard) cannot shard int8 parameters "
                      "(pytorch#177844: it fails with 'only Tensors of floating point dtype can require gradients'); to "
                      "shard this model with FSDP2 use a newer torch (2.14 is tested). DDP trains int8 weights with "
                      "any supported torch.", RuntimeWarning, stacklevel=3)


def apply(model: nn.Module, the_plan: Plan, config: WrapConfig) -> Plan:
    """Apply a checked plan (wrap's last part), with the first-step monitor where the plan predicts memory."""
    state = inject.apply_wrap(model, the_plan, config)
    if the_plan.memory:  # compare with the measurement after the first step with optimizer states
        from .planning.monitor import Monitor

        state.monitor = Monitor(model, the_plan)
    return the_plan


def unwrap(model: nn.Module) -> nn.Module:
    """Restore the original modules with every update merged; the model is plain PyTorch again."""
    state = inject.require_wrapped(model, "unwrap")
    if state.monitor is not None:
        state.monitor.remove()
    inject.restore_all(model)
    object.__delattr__(model, inject.STATE_ATTR)
    return model


def sync(optimizer: torch.optim.Optimizer) -> int:
    """After `optimizer.load_state_dict(...)` with a non-memwrap optimizer: restore each layer's projection index.

    Makes a resumed run bit-identical to an uninterrupted one (memwrap.optimizer does this by itself).
    """
    from .compress import merge

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidSettingsError(f"memwrap.sync takes the optimizer (a torch.optim.Optimizer) whose state was just "
                                   f"loaded; got {type(optimizer).__name__}.")
    return merge.sync(optimizer)


def register_first_moment(names, keys, module: str = "", carry=None) -> None:
    """Tell memwrap which optimizer state holds the first moment, for an optimizer it does not know.

    names: the optimizer's class name(s); keys: its state entries shaped like the parameter that hold a first
    moment (an empty list: it has none). When P is refreshed, memwrap carries those into the new subspace.
    carry(state, keys, T) replaces the plain `state[key] @ T` for states that are not float tensors.
    """
    from .compress import merge

    names, keys = _as_tuple(names, "names"), _as_tuple(keys, "keys")
    if not names or keys is None:
        raise InvalidSettingsError(f"names={names!r} and keys={keys!r}: pass the optimizer's class name(s), e.g. "
                                   "'Lion', and the state keys of its first moment ([] if it has none).")
    if not isinstance(module, str):
        raise InvalidSettingsError(f"module={module!r} must be a string (a module-name prefix, '' for any).")
    if carry is not None and not callable(carry):
        raise InvalidSettingsError(f"carry={carry!r} must be a function carry(state, keys, T) or None.")
    merge.register_first_moment(names, keys, module, carry)


def report(model: nn.Module) -> str:
    """Predicted vs measured memory per part (measured after the first training step; on a GPU its peak)."""
    from .planning.monitor import report as _report

    state = inject.require_wrapped(model, "report")
    return _report(model, state.monitor, state.plan)


def skipped_steps(model: nn.Module) -> int:
    """How many optimizer steps memwrap skipped for inf/NaN gradients (wrap(nonfinite="skip")) since wrap or load."""
    from .compress.merge import units_of

    inject.require_wrapped(model, "skipped_steps")
    return max((getattr(u, "skipped_steps", 0) for u in units_of(model)), default=0)


def get_plan(model: nn.Module) -> Plan:
    """The Plan a wrapped model was wrapped with."""
    return inject.require_wrapped(model, "get_plan").plan


def optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    *,
    kind: str | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    error_feedback: bool = False,
    no_decay=("bias", "norm", "embed"),
    compile_step: bool = False,
) -> torch.optim.Optimizer:
    """The matching optimizer: ProjFactor or subspace AdamW ("adamw") for wrapped layers, AdamW for the rest.

    kind=None takes the one the plan counted (a plan from a memory budget names it), else subspace AdamW: it is
    closer to AdamW's loss (tools/quality.py, docs/quality.md); ProjFactor keeps about 30% fewer state bytes.
    compile_step=True writes bf16 weights through one torch.compile'd kernel per wave (the update, its decay and the
    stochastic rounding fused; the first step compiles it). Experimental: not yet measured on a GPU.
    """
    from .optim import MemwrapOptimizer

    state = inject.require_wrapped(model, "optimizer")
    kind = kind if kind is not None else (state.plan.optimizer or "adamw")
    if not isinstance(compile_step, bool):
        raise InvalidSettingsError(f"compile_step={compile_step!r} must be True or False.")
    opt = MemwrapOptimizer.for_model(model, lr=lr, kind=kind, betas=betas, eps=eps, weight_decay=weight_decay,
                                     error_feedback=error_feedback, no_decay=_as_tuple(no_decay, "no_decay") or ())
    opt.compile_step = compile_step
    return opt


def simulate(model_or_config, plan=None, *, batch_size: int | None = None, seq_len: int | None = None, steps: int = 3,
             budget_gb: float | None = None, dtype: str | None = None, optimizer: str | None = None):
    """Run `steps` training steps of the wrapped model on fake (meta) tensors; returns a Simulation whose `.steps[i]`
    holds the peak allocated bytes after "forward", "backward" and "optimizer" of step i, and `.peak` the largest.

    model_or_config: a bundled name ('llama-2-7b'), a config.json or model directory, a model on the meta device, or a
    real model (not touched: a meta copy runs). plan: a Plan or a saved plan's path; "plain" runs the model unwrapped
    with torch AdamW; None plans from budget_gb as wrap(budget_gb=...) would. batch_size and seq_len default to the
    plan's. optimizer: "memwrap" (memwrap.optimizer; the default with a plan) or "adamw" (torch.optim.AdamW).
    Counts what the CUDA caching allocator would allocate (memwrap.planning.simulate says how and what it leaves out).
    """
    from .config import Plan, WrapConfig
    from .planning import planner
    from .planning.estimate import dtype_from_name
    from .planning.simulate import check_arguments, run_plan

    name, _ = check_arguments(model_or_config, plan, steps, dtype, optimizer)  # before anything is planned
    if isinstance(plan, str) and plan == "plain":
        the_plan = plan
    elif plan is None:
        if isinstance(model_or_config, str | os.PathLike):
            the_plan = planner.plan(os.fspath(model_or_config), budget_gb=budget_gb, batch_size=batch_size,
                                    seq_len=seq_len, dtype=name)
        else:  # planning reads the model without changing it, as wrap(budget_gb=...) would
            the_plan = planner.plan_for_model(model_or_config, WrapConfig(), budget_gb=budget_gb,
                                              batch_size=batch_size, seq_len=seq_len,
                                              dtype_bytes=dtype_from_name(name)[1])
    else:
        the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    planned = the_plan if isinstance(the_plan, Plan) else None
    batch = batch_size or (planned.batch_size if planned is not None and planned.batch_size else None) \
        or planner.DEFAULT_BATCH_SIZE
    seq = seq_len or (planned.seq_len if planned is not None and planned.seq_len else None) \
        or planner.DEFAULT_SEQ_LEN
    return run_plan(model_or_config, the_plan, batch_size=batch, seq_len=seq, steps=steps, dtype=dtype,
                    optimizer=optimizer)
