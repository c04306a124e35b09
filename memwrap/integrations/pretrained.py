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
resident beyond the tensor being loaded. Keys must match the model's state dict (what transformers' save_pretrained
writes: checkpoints that transformers renames or fuses while loading, e.g. per-expert MoE weights, are refused with
what to do instead).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import replace

import torch
from torch import nn

from ..errors import CheckpointMismatchError, CheckpointNotFoundError, InvalidSettingsError

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


def from_pretrained(name_or_dir, *, weights: str = "int8", budget_gb: float | None = None,
                    batch_size: int | None = None, seq_len: int | None = None, dtype=torch.bfloat16,
                    device=None, plan=None, **wrap_kwargs) -> nn.Module:
    """The causal LM in `name_or_dir` (a directory save_pretrained wrote, or a hub id), wrapped, with its compressed
    weights loaded straight into 8 bits (weights="int8"/"fp8"; "auto": where the budget needs them; "keep": as
    stored), without ever holding the model in its full dtype. dtype: of every other weight and of the activations.
    device: where the model lives (default: cuda if available, else cpu). plan: a Plan (or its path) instead of
    planning from budget_gb/batch_size/seq_len (and the other wrap settings in wrap_kwargs, as memwrap.plan takes them).
    Returns the wrapped model; build the optimizer with memwrap.optimizer(model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..api import apply
    from ..compress import inject
    from ..compress.merge import units_of
    from ..config import Plan, WrapConfig, check_weights
    from ..planning import planner

    check_weights(weights)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidSettingsError(f"dtype={dtype!r} must be a floating torch dtype (torch.bfloat16, torch.float32).")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
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
    if device.type == "cuda" and plan.memory:
        from ..planning import card

        if card.enable_expandable_segments():  # the headroom the plan reserved assumes them (as wrap does)
            plan = replace(plan, notes=plan.notes + (
                "memwrap turned on the CUDA allocator's expandable segments (PYTORCH_CUDA_ALLOC_CONF was unset; set it "
                "to keep your own allocator settings)",))
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


def _fill(model: nn.Module, files: list[str], device: torch.device) -> None:
    """Every parameter and persistent buffer from the files (8-bit weights quantized as they arrive);
    non-persistent buffers (rotary frequencies) initialized by the model's own `_init_weights`."""
    from ..compress import quant
    from ..compress.merge import units_of

    units = {}
    for unit in units_of(model):
        units[id(unit.weight)] = unit
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers()))
    prefix = getattr(model, "base_model_prefix", "")
    loaded: set[str] = set()
    with torch.no_grad():
        for path in files:
            header, start = read_header(path)
            with open(path, "rb") as f:
                for key, entry in header.items():
                    name = key if key in targets else f"{prefix}.{key}" if f"{prefix}.{key}" in targets else None
                    if name is None:
                        raise CheckpointMismatchError(
                            f"{os.path.basename(path)} holds {key!r}, which {type(model).__name__} does not have under "
                            "that name: the checkpoint is stored in a layout transformers converts while loading (e.g. "
                            "per-expert MoE weights). Load it once with transformers and save_pretrained it, then "
                            "load that directory; or load the model with transformers and wrap(model, weights=...).")
                    t = read_tensor(f, entry, start).to(device)
                    target = targets[name]
                    if tuple(t.shape) != tuple(target.shape):
                        raise CheckpointMismatchError(f"{key!r} has shape {tuple(t.shape)} in {path!r}, the model "
                                                      f"expects {tuple(target.shape)}: a checkpoint of another config.")
                    unit = units.get(id(target))
                    if unit is not None and unit.quant is not None:
                        q, s = quant.quantize(t, unit.quant, unit.transposed, LOAD_CHUNK_BYTES)
                        target.copy_(q)
                        unit.scale.copy_(s)
                        loaded.add(name)
                        loaded.add(next(n for n, p in targets.items() if p is unit.scale))
                    else:
                        target.copy_(t)
                        loaded.add(name)
                    del t
        for unit in units_of(model):  # coords: released zeros (an optimizer that writes them gets storage back)
            loaded.add(next(n for n, p in targets.items() if p is unit.coords))
            unit.sync_live()
    persistent = set(model.state_dict())
    missing = [n for n in targets if n not in loaded and n in persistent and not _tied(model, n, loaded)]
    if missing:
        raise CheckpointMismatchError(f"the checkpoint has no values for {len(missing)} of the model's tensors (e.g. "
                                      f"{missing[:3]}): a checkpoint of another model or config.")
    for module in model.modules():  # non-persistent buffers (rotary inv_freq): what the model's own init computes
        if any(True for _ in module.buffers(recurse=False)) and not any(True for _ in module.parameters(recurse=False)):
            model._init_weights(module)


def _tied(model: nn.Module, name: str, loaded: set[str]) -> bool:
    """`name` is a parameter tied to one that was loaded (the same tensor: the output head tied to the embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(name)
    return p is not None and any(params.get(n) is p for n in loaded)
