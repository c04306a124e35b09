"""Simulate training steps on the meta device and count the bytes a CUDA caching allocator would hand out.

`memwrap.simulate(model_or_config, plan)` builds the model without weights (meta tensors), applies the plan exactly as
`wrap` does, and runs the real training step `steps` times: forward with labels, backward, the optimizer's step,
zero_grad. A TorchDispatchMode sees every tensor each ATen op creates and keeps a weak reference to its storage; the
live bytes are the sum over storages still alive, each rounded up to the allocator's 512-byte block, and the peak is
tracked through every allocation and free, per phase, as `torch.cuda.max_memory_allocated` read after each phase of a
step whose peak statistics were reset at its start.

What differs from a real GPU run, on purpose:
- attention: on the meta device PyTorch's SDPA falls back to its math path (it materializes the S × S scores), while a
  CUDA GPU runs flash (or memory-efficient) attention for bf16/fp16. The simulation routes SDPA calls to the fused
  kernels' own ATen ops, whose outputs (and what they save: out, logsumexp) are what a GPU allocates.
- values: meta tensors hold none. A host read (`.item()`) gets the common case: True for a flag (finite gradients),
  0 for a count (nothing written behind the optimizer's back), 1.0 for a float (a step counter).
Not counted (they are not `allocated` bytes on a GPU either): the CUDA context, library workspaces created outside
the caching allocator, and the allocator's reserved-but-unused blocks. The planner reserves those as named parts.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import InvalidSettingsError

ALLOCATOR_BLOCK = 512  # the CUDA caching allocator rounds every request up to a multiple of this
PHASES = ("forward", "backward", "optimizer")


def allocator_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator counts as allocated for a request of `nbytes`."""
    return 0 if nbytes <= 0 else -(-nbytes // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK


class LiveBytes(TorchDispatchMode):
    """Live storage bytes (allocator-rounded) of every tensor created inside the mode, plus those `add`ed before; the
    peak since the last `reset_peak`. Frees are seen through weak references to the storages."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0  # exact after a sweep; an upper bound between sweeps (frees only lower it)
        self.peak = 0
        self.host_reads = 0

    def add(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        known = self._live.get(key)
        if known is not None and not known[0].expired():
            return
        nbytes = allocator_bytes(st.nbytes())
        self._live[key] = (StorageWeakRef(st), nbytes)
        self.current += nbytes - (known[1] if known is not None else 0)
        if self.current > self.peak:
            self.sweep()
            self.peak = max(self.peak, self.current)

    def sweep(self) -> int:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            del self._live[k]
        self.current = sum(n for _, n in self._live.values())
        return self.current

    def reset_peak(self) -> None:
        self.peak = self.sweep()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
            return _common_case(args[0])
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _common_case(t: torch.Tensor):
    """The value a host read of a meta tensor stands for in a healthy step (see the module docstring)."""
    if t.dtype == torch.bool:
        return True
    if not t.dtype.is_floating_point:
        return 0
    return 1.0


class FusedAttention(TorchFunctionMode):
    """SDPA as a GPU runs it for 16-bit inputs: flash attention (no mask) or memory-efficient attention (a mask), so
    the simulation allocates and saves what those kernels do instead of the math path's S × S scores."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args, strict=False), **kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        mask, dropout, causal, scale = a.get("attn_mask"), a.get("dropout_p", 0.0), a.get("is_causal", False), a.get("scale")
        if q.dtype not in (torch.bfloat16, torch.float16):
            return func(*args, **kwargs)
        if mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout, causal, False, scale=scale)[0]
        if k.shape[1] != q.shape[1]:  # memory-efficient attention takes equal heads: expanded as SDPA would
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        bias = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device)
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout, causal,
                                                                       scale=scale)[0]


SIMULATED_SDPA = "memwrap-simulated-sdpa"  # an attention implementation of transformers' AttentionInterface


def _fused_sdpa_forward(module, *args, **kwargs):
    """transformers' own sdpa attention with FusedAttention active. Entered from inside the attention call, so a
    checkpoint's recomputation (which runs without the caller's torch-function modes) routes the same way."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with FusedAttention():
        return sdpa_attention_forward(module, *args, **kwargs)


def _route_attention(model: nn.Module) -> None:
    """The simulated copy's sdpa attention through FusedAttention, by transformers' sanctioned extension point (a
    registered attention implementation, selected on this copy's config only)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SIMULATED_SDPA, _fused_sdpa_forward)
    AttentionMaskInterface.register(SIMULATED_SDPA, sdpa_mask)
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and getattr(sub, "_attn_implementation", None) == "sdpa":
            sub._attn_implementation = SIMULATED_SDPA


@dataclass
class Simulation:
    """What `memwrap.simulate` measured. `steps[i][phase]`: the peak allocated bytes of step i from its start to the
    end of that phase ("forward", "backward", "optimizer"); `peak`: the largest of them; `resident`: bytes alive before
    the first step (weights and buffers)."""

    steps: list[dict[str, int]]
    resident: int
    plan: object = None
    batch_size: int = 0
    seq_len: int = 0
    host_reads_per_step: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(max(s.values()) for s in self.steps)

    @property
    def steady(self) -> dict[str, int]:
        """The last step's phases: the steady state (optimizer states exist from the second step on)."""
        return self.steps[-1]

    def table(self) -> str:
        lines = [f"{'step':<6}" + "".join(f"{'after ' + p:>18}" for p in PHASES)]
        for i, s in enumerate(self.steps, 1):
            lines.append(f"{i:<6}" + "".join(f"{s[p] / 1e9:>15.3f} GB" for p in PHASES))
        lines.append(f"simulated peak {self.peak / 1e9:.3f} GB (allocated; weights and buffers {self.resident / 1e9:.3f} GB)")
        return "\n".join(lines)


def _meta_twin(model: nn.Module) -> nn.Module:
    """A copy of a model whose parameters and buffers are meta tensors (the original is not touched)."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
    return copy.deepcopy(model, memo)


def check_arguments(model_or_config, plan, steps, dtype: str | None, optimizer: str | None) -> tuple[str, str]:
    """InvalidSettingsError for what a simulation cannot take, before anything is planned or built; returns
    (the dtype name the run uses, the optimizer kind)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InvalidSettingsError(f"steps={steps!r} must be a positive integer (3 shows the steady state).")
    plain = isinstance(plan, str) and plan == "plain"
    kind = optimizer or ("adamw" if plain else "memwrap")
    if kind not in ("adamw", "memwrap"):
        raise InvalidSettingsError(f"optimizer={optimizer!r}: use 'memwrap' or 'adamw'.")
    if isinstance(model_or_config, nn.Module):
        from ..compress.inject import STATE_ATTR

        if getattr(model_or_config, STATE_ATTR, None) is not None:
            raise InvalidSettingsError("memwrap.simulate takes the model before wrap (or its config name) and the plan: "
                                       "simulate(model_or_config, plan=memwrap.get_plan(model)).")
        param = next(model_or_config.parameters(), None)
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            param.dtype if param is not None else torch.float32, "fp32")
        return dtype or name, kind
    if not isinstance(model_or_config, str | os.PathLike):
        raise InvalidSettingsError(f"memwrap.simulate takes a model, a model name (e.g. 'llama-2-7b'), a config.json or "
                                   f"a model directory; got {type(model_or_config).__name__}.")
    return dtype or "bf16", kind


def meta_model_of(model_or_config, dtype: str) -> nn.Module:
    """A meta copy of the model, or the model built from a config on the meta device in `dtype`."""
    from .estimate import dtype_from_name, load_config, meta_model

    if isinstance(model_or_config, nn.Module):
        return _meta_twin(model_or_config)
    config = load_config(os.fspath(model_or_config))
    config._attn_implementation = "sdpa"  # what a GPU run loads by default
    return meta_model(config).to(dtype_from_name(dtype)[0])


def run_plan(model_or_config, plan, *, batch_size: int, seq_len: int, steps: int = 3, dtype: str | None = None,
             optimizer: str | None = None) -> Simulation:
    """The simulation itself (memwrap.simulate resolves the plan and the defaults first): `plan` is a Plan or
    "plain" (the model unwrapped, stepped by torch AdamW)."""
    from ..compress import inject
    from ..config import WrapConfig
    from ..optim import MemwrapOptimizer

    dtype, kind = check_arguments(model_or_config, plan, steps, dtype, optimizer)
    plain = isinstance(plan, str) and plan == "plain"
    model = meta_model_of(model_or_config, dtype)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise InvalidSettingsError(f"{type(model).__name__} has no config.vocab_size: memwrap.simulate runs models that "
                                   "take input_ids and labels (transformers causal or masked LMs).")
    for module in model.modules():  # a hub-kernelized model re-kernelizes on train(); `kernels` refuses meta tensors
        if module.__dict__.get("_use_kernels"):
            module._use_kernels = False  # (on this meta copy only: its layers keep the forwards they were given)
    _route_attention(model)
    if not plain:
        inject.check_plan_against_model(model, plan)
        inject.apply_wrap(model, plan, WrapConfig(nonfinite="skip"))

    def build():
        if kind == "memwrap" and not plain:  # what memwrap.optimizer(model) builds
            return MemwrapOptimizer.for_model(model, lr=1e-3, kind=plan.optimizer or "adamw", betas=(0.9, 0.999),
                                              eps=1e-8, weight_decay=0.0, error_feedback=False,
                                              no_decay=("bias", "norm", "embed"))
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=False, foreach=False)

    out, resident, live = measure_steps(model, build, batch_size=batch_size, seq_len=seq_len, steps=steps)
    return Simulation(steps=out, resident=resident, plan=None if plain else plan, batch_size=batch_size,
                      seq_len=seq_len, host_reads_per_step=live.host_reads / steps)


def measure_steps(model: nn.Module, build_optimizer, *, batch_size: int, seq_len: int, steps: int,
                  batches=None) -> tuple[list[dict[str, int]], int, LiveBytes]:
    """Train `model` for `steps` steps under LiveBytes and return (per-step phase peaks, resident bytes, the meter).

    The same loop for a meta model (memwrap.simulate) and a real one (what the tests measure on a CPU): the optimizer
    is built inside the meter, so what it allocates (or releases) up front is counted; batches(step) gives
    (input_ids, labels), by default zeros on the model's device."""
    device = next(model.parameters()).device
    live = LiveBytes()
    live.add(list(model.parameters()) + list(model.buffers()))
    with live:
        opt = build_optimizer()
    resident = live.sweep()
    out: list[dict[str, int]] = []
    model.train()
    with live:
        for step in range(steps):
            live.reset_peak()
            if batches is None:
                ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
                labels = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
            else:
                ids, labels = batches(step)
            phases = {}
            loss = model(input_ids=ids, labels=labels).loss
            phases["forward"] = live.peak
            loss.backward()
            del loss
            phases["backward"] = live.peak
            opt.step()
            opt.zero_grad(set_to_none=True)
            phases["optimizer"] = live.peak
            del ids, labels
            out.append(phases)
    return out, resident, live
