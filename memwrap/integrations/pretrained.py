"""`memwrap.from_pretrained`: load a transformers model straight into its wrapped 8-bit form, one tensor at a time.

A 7B in bf16 is 13.5 GB; its int8 form is 6.7 GB. Loading it with transformers and then wrapping it would need the
whole bf16 model first. Here the model is built on the meta device, planned (`memwrap.plan` on its config: the
budget, batch and weights= decide rank, recompute and which weights go to 8 bits), wrapped while still on the meta
device (so its 8-bit weights and scales are meta tensors of the right dtype), materialized empty on the target device,
and filled from the safetensors files one tensor at a time: a tensor of a wrapped 8-bit weight is read, quantized
(a block of rows at a time) into the 8-bit storage and dropped. The peak is the 8-bit model plus one tensor as stored
and one quantization chunk.

The files are read with plain file reads into each tensor's own buffer (the safetensors format: an 8-byte header size,
a JSON header of dtypes, shapes and byte ranges, the raw bytes), not through a memory map, so nothing of a file stays
resident beyond the tensor being loaded. Keys must match the model's state dict, or be the per-expert MoE keys that
transformers 5 stacks into fused expert tensors while loading (and writes back out in save_pretrained) for the families
in PER_EXPERT_FAMILIES: each expert's part fills its rows of the fused tensor (quantized as it arrives). Any other
layout transformers converts is refused with what to do instead.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

import torch
from torch import nn

from ..compress import experts, quant
from ..errors import CheckpointMismatchError, CheckpointNotFoundError, InvalidSettingsError
from .checkpoint import is_tied_duplicate

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
LOAD_CHUNK_BYTES = 64 << 20  # quantization transient per block of rows while loading


def read_header(path: str) -> tuple[dict, int]:
    """(the JSON header of a safetensors file, the offset its data starts at)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointMismatchError(f"{path!r} is not a readable safetensors file ({e}).") from e
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensor(f, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor of an open safetensors file, read into a buffer of its own (no memory map)."""
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointMismatchError(f"safetensors dtype {entry['dtype']!r} is not supported by memwrap's loader.")
    begin, end = entry["data_offsets"]
    out = torch.empty(entry["shape"], dtype=dtype)
    raw = out.view(-1).view(torch.uint8) if out.numel() else out.view(torch.uint8)
    f.seek(data_start + begin)
    if f.readinto(memoryview(raw.numpy())) != end - begin:
        raise CheckpointMismatchError(f"{f.name!r} ends before tensor data it declares: the file is truncated.")
    return out


def shard_files(directory: str) -> list[str]:
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not names:
        raise CheckpointNotFoundError(f"no .safetensors weights in {directory!r}: memwrap.from_pretrained reads "
                                      "safetensors files (what save_pretrained writes).")
    return [os.path.join(directory, n) for n in names]


def resolve_directory(name_or_dir: str | os.PathLike) -> str:
    """A local directory, or a hub id resolved through the Hugging Face cache (downloading where that is allowed)."""
    path = os.fspath(name_or_dir)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as e:  # noqa: BLE001 - every hub / network / filesystem failure says the same to the user
        raise InvalidSettingsError(f"cannot find model {path!r}: not a local directory, and the hub gave "
                                   f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}. Pass the "
                                   "directory save_pretrained wrote.") from e


def from_pretrained(name_or_dir, *, weights: str | None = None, budget_gb: float | None = None,
                    batch_size: int | None = None, seq_len: int | None = None, dtype=torch.bfloat16,
                    device=None, plan=None, **wrap_kwargs) -> nn.Module:
    """The causal LM in `name_or_dir` (a directory save_pretrained wrote, or a hub id), wrapped, with its compressed
    weights loaded straight into 8 bits (weights="int8", the default, or "fp8"; "auto": where the budget needs them;
    "keep": as stored), without ever holding the model in its full dtype. dtype: of every other weight and of the activations.
    device: where the model lives (default: cuda if available, else cpu). plan: a Plan (or its path) instead of
    planning from budget_gb/batch_size/seq_len (and the other wrap settings in wrap_kwargs, as memwrap.plan takes them).
    Returns the wrapped model; build the optimizer with memwrap.optimizer(model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..api import apply, with_expandable_segments
    from ..compress import inject
    from ..compress.merge import units_of
    from ..config import Plan, WrapConfig, check_weights
    from ..planning import planner

    if plan is not None and weights is not None:
        raise InvalidSettingsError("pass either plan= or weights=, not both: a plan fixes how the weights are stored "
                                   "(its `weights` field).")
    weights = "int8" if weights is None else weights
    check_weights(weights)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidSettingsError(f"dtype={dtype!r} must be a floating torch dtype (torch.bfloat16, torch.float32).")
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise InvalidSettingsError(f"device={device!r} is not a torch device ({e}); pass 'cuda', 'cuda:1' or 'cpu'.") \
            from None
    directory = resolve_directory(name_or_dir)
    files = shard_files(directory)
    config = AutoConfig.from_pretrained(directory)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if dtype_name is None:
        raise InvalidSettingsError(f"dtype={dtype!r}: use torch.bfloat16, torch.float16 or torch.float32.")
    wrap_config = WrapConfig(nonfinite=wrap_kwargs.get("nonfinite", "skip"))
    if plan is None:
        plan = planner.plan(directory, budget_gb=budget_gb, batch_size=batch_size, seq_len=seq_len, dtype=dtype_name,
                            device="cuda" if device.type == "cuda" else "cpu", weights=weights, **wrap_kwargs)
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if device.type == "cuda":
        plan = with_expandable_segments(plan)  # as wrap does
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    inject.check_plan_against_model(model, plan)
    apply(model, plan, wrap_config)  # on the meta device: 8-bit weights and scales are meta tensors of their dtype
    shapes = [(u, tuple(u.coords.shape)) for u in units_of(model)]
    for u, _ in shapes:  # released (one broadcast zero, memwrap.compress.base.release): nothing to allocate
        u.coords.data = torch.empty(0, dtype=u.coords.dtype, device="meta")
    model.to_empty(device=device)  # (new Parameter objects, module by module: read them again from the modules)
    for u, shape in shapes:
        u.coords.data = torch.zeros((), dtype=u.coords.dtype, device=device).expand(shape)
    model.tie_weights()  # to_empty made new tensors module by module: tie the embeddings again (loaded once)
    _fill(model, files, device)
    return model


# Per-expert checkpoint keys (what transformers 5 save_pretrained writes for these families, and the hub layout):
# <...>.experts.<e>.<part>.weight, stacked by transformers into the fused [E, n, m] tensors while it loads. memwrap fills
# each expert's rows of the fused tensor as they arrive (gate rows first, then up, as transformers concatenates them).
# Only the families whose conversion is exactly that (and tested) are read this way; others are refused.
PER_EXPERT_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
EXPERT_PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
KEY_RENAMES = ((".block_sparse_moe.", ".mlp."),)  # Mixtral's checkpoint names for the MoE block
PER_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


@dataclass
class _Slot:
    """Where one tensor of the checkpoint goes: a whole parameter, or rows of one expert of a fused expert tensor."""

    name: str  # the parameter's (or buffer's) name in the model
    target: torch.Tensor
    expert: int | None = None
    row0: int = 0  # first logical row of the part within the expert's weight

    def view(self, t: torch.Tensor, transposed: bool) -> torch.Tensor:
        """The slot's part of `t` (a tensor shaped like the target), logical orientation for an expert's rows."""
        if self.expert is None:
            return t
        return quant.logical(t[self.expert], transposed)


def _slot(key: str, model: nn.Module, targets: dict, modules: dict, prefix: str, shape: tuple) -> _Slot | None:
    for name in (key, f"{prefix}.{key}"):
        if name in targets:
            return _Slot(name, targets[name])
    if getattr(model.config, "model_type", "") not in PER_EXPERT_FAMILIES:
        return None
    for old, new in KEY_RENAMES:
        key = key.replace(old, new)
    for name in (key, f"{prefix}.{key}"):
        if name in targets:
            return _Slot(name, targets[name])
    m = PER_EXPERT_KEY.match(key)
    if m is None:
        return None
    path, expert, part = m.group(1), int(m.group(2)), EXPERT_PARTS.get(m.group(3))
    module = modules.get(path) or modules.get(f"{prefix}.{path}")
    if module is None or part is None or not experts.is_fused_experts(module):
        return None
    pname = "down_proj" if part == "down" else ("gate_up_proj" if module.has_gate else "up_proj")
    full = next(n for n, mod in modules.items() if mod is module) + "." + pname
    row0 = shape[0] if part == "up" and module.has_gate else 0
    return _Slot(full, targets[full], expert, row0)


def _fill(model: nn.Module, files: list[str], device: torch.device) -> None:
    """Every parameter and persistent buffer from the files (8-bit weights quantized as they arrive, per-expert
    checkpoints into their fused tensors); non-persistent buffers (rotary frequencies) initialized by the model's own
    `_init_weights`."""
    from ..compress.merge import units_of

    units = {id(unit.weight): unit for unit in units_of(model)}
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers()))
    names = {id(t): n for n, t in targets.items()}
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    filled: dict[str, int] = {}  # elements written per target
    with torch.no_grad():
        for path in files:
            header, start = read_header(path)
            with open(path, "rb") as f:
                for key, entry in header.items():
                    slot = _slot(key, model, targets, modules, prefix, tuple(entry["shape"]))
                    if slot is None:
                        raise CheckpointMismatchError(
                            f"{os.path.basename(path)} holds {key!r}, which {type(model).__name__} does not have under "
                            "that name: the checkpoint is stored in a layout transformers converts while loading, which "
                            "memwrap.from_pretrained reads only for per-expert MoE weights of "
                            f"{', '.join(PER_EXPERT_FAMILIES)}. Load the model with transformers and wrap(model, "
                            "weights=...) instead (its peak is then the model in its dtype).")
                    unit = units.get(id(slot.target))
                    transposed = unit.transposed if unit is not None else bool(
                        getattr(modules.get(slot.name.rpartition(".")[0]), "is_transposed", False))
                    target = slot.view(slot.target, transposed)
                    rows = slice(slot.row0, slot.row0 + entry["shape"][0]) if slot.expert is not None else slice(None)
                    expected = tuple(target[rows].shape)
                    if tuple(entry["shape"]) != expected:
                        raise CheckpointMismatchError(f"{key!r} has shape {tuple(entry['shape'])} in {path!r}, the "
                                                      f"model expects {expected}: a checkpoint of another config.")
                    t = read_tensor(f, entry, start).to(device)
                    if unit is not None and unit.quant is not None:
                        q, sc = quant.quantize(t, unit.quant, unit.transposed if slot.expert is None else False,
                                               LOAD_CHUNK_BYTES)
                        target[rows].copy_(q)
                        slot.view(unit.scale, False)[rows].copy_(sc)
                        scale_name = names[id(unit.scale)]
                        filled[scale_name] = filled.get(scale_name, 0) + sc.numel()
                    else:
                        target[rows].copy_(t)
                    filled[slot.name] = filled.get(slot.name, 0) + t.numel()
                    del t
        for unit in units_of(model):  # coords: released zeros (an optimizer that writes them gets storage back)
            filled[names[id(unit.coords)]] = unit.coords.numel()
            unit.sync_live()
    loaded = {n for n, count in filled.items() if count == targets[n].numel()}
    persistent = set(model.state_dict())
    missing = [n for n in targets if n not in loaded and n in persistent and not is_tied_duplicate(model, n, loaded)]
    if missing:
        raise CheckpointMismatchError(f"the checkpoint has no values (or not all of them) for {len(missing)} of the "
                                      f"model's tensors (e.g. {missing[:3]}): a checkpoint of another model or config.")
    for module in model.modules():  # non-persistent buffers (rotary inv_freq): what the model's own init computes
        if any(True for _ in module.buffers(recurse=False)) and not any(True for _ in module.parameters(recurse=False)):
            model._init_weights(module)
