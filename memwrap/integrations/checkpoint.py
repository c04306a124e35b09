"""Checkpoints: `save` a wrapped model (and its optimizer), `load` it back and re-wrap.

A checkpoint directory holds plain files any tool can read:

    model.safetensors (+ config.json ... for a transformers model)   weights, the original model's keys
    memwrap_plan.json                                                the Plan; `wrap(model, plan=...)` reapplies it
    memwrap_state.json                                               each wrapped weight's step counter (which P)
    optimizer.pt                                                     optimizer.state_dict(), tensors and numbers only
    memwrap_manifest.json                                            format version; size and SHA-256 of every file

`load` and `load_optimizer` check the manifest before reading anything into the model: a truncated, missing or altered
file raises CheckpointCorruptError, a newer format CheckpointVersionError (directories without a manifest, e.g.
save_pretrained output or memwrap 0.1.0 checkpoints, load unchecked). Every OS or format error becomes a
CheckpointError subclass naming the path (memwrap.errors).

`save` writes the whole directory beside the target (`<dir>.tmp-*`) and swaps it in with renames, so a crash at
any point leaves the previous checkpoint loadable: either `<dir>` is complete, or the rename was interrupted and
`<dir>.old` holds the previous one, which `load` (and the next `save`) put back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile

import torch
from torch import nn

from ..atomic import atomic_write_bytes, atomic_write_text
from ..compress.inject import check_plan_against_model, is_wrapped, require_module, require_wrapped
from ..compress.merge import sync, units_of
from ..config import Plan
from ..errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    CheckpointWriteError,
    InvalidSettingsError,
    PlanMismatchError,
)

PLAN_NAME = "memwrap_plan.json"
STATE_NAME = "memwrap_state.json"
STATE_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
MANIFEST_NAME = "memwrap_manifest.json"
CHECKPOINT_FORMAT_VERSION = 1  # of the directory as a whole (the manifest); a newer one is refused


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str) -> None:
    """memwrap_manifest.json: the format version and each file's size and SHA-256 (written last, before the swap)."""
    from .. import __version__

    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    atomic_write_text(os.path.join(directory, MANIFEST_NAME), json.dumps(
        {"format": "memwrap-checkpoint", "format_version": CHECKPOINT_FORMAT_VERSION, "memwrap_version": __version__,
         "files": dict(sorted(files.items()))}, indent=1))


def verify(directory: str | os.PathLike, names: tuple[str, ...] | None = None) -> bool:
    """Check a checkpoint against its manifest before anything is read from it: every listed file (or those of
    `names` that are listed) exists with its size and SHA-256. False when the directory has no manifest (written by
    save_pretrained or memwrap 0.1.0: nothing to check against)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"checkpoint directory {directory!r} does not exist; pass the directory "
                                      "memwrap.save (or save_pretrained) wrote.")
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        version, files = manifest["format_version"], manifest["files"]
        listed = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointCorruptError(f"{path!r} is not a readable memwrap manifest ({e}); the checkpoint is damaged: "
                                     "load an earlier one, or save again.") from e
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointVersionError(f"checkpoint {directory!r} has format {version!r}; this memwrap reads up to "
                                     f"{CHECKPOINT_FORMAT_VERSION}. Upgrade memwrap (pip install -U memwrap) to load it.")
    for rel, (size, digest) in listed.items():
        if names is not None and rel not in names:
            continue
        file = os.path.join(directory, rel)
        if not os.path.exists(file):
            raise CheckpointCorruptError(f"{file!r} is missing from checkpoint {directory!r} (its manifest lists it); "
                                         "the checkpoint is incomplete: load an earlier one, or save again.")
        actual = os.path.getsize(file)
        if actual != size:
            raise CheckpointCorruptError(f"{file!r} has {actual} bytes, its manifest says {size}: the file is "
                                         f"{'truncated' if actual < size else 'altered'}. Nothing was loaded; load an "
                                         "earlier checkpoint, or save again.")
        if _sha256(file) != digest:
            raise CheckpointCorruptError(f"{file!r} fails its SHA-256 check (the bytes changed after memwrap.save "
                                         "wrote them). Nothing was loaded; load an earlier checkpoint, or save again.")
    return True


def _stage(name: str) -> None:
    """Called between the steps of `save`; the crash tests replace it to kill the process at each point."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def recover(directory: str | os.PathLike) -> None:
    """Finish or undo a swap a crash interrupted, and remove leftovers of unfinished saves."""
    final = os.path.abspath(os.fspath(directory))
    old = final + ".old"
    if os.path.isdir(old):
        if os.path.isdir(final):
            shutil.rmtree(old)  # the new checkpoint was in place; only the cleanup was missed
        else:
            os.rename(old, final)  # crashed between the two renames: the previous checkpoint comes back
    parent, base = os.path.split(final)
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if name.startswith(base + ".tmp-"):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _write_weights(model: nn.Module, directory: str) -> None:
    if hasattr(model, "save_pretrained"):  # transformers: config.json too, so from_pretrained reads it
        model.save_pretrained(directory, safe_serialization=True)
        return
    from safetensors.torch import save_model

    save_model(model, os.path.join(directory, WEIGHTS_NAME))


def save(model: nn.Module, directory: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> str:
    """Save weights (safetensors, the original keys), the plan (JSON) and optionally the optimizer, atomically.

    The directory is replaced as a whole; a crash mid-save leaves the previous checkpoint loadable by `load`.
    """
    require_module(model, "save")
    _require_path(directory, "save")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidSettingsError(f"memwrap.save: optimizer= takes a torch.optim.Optimizer (or None), got "
                                   f"{type(optimizer).__name__}.")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if any(hasattr(p, "device_mesh") for p in model.parameters()):
        raise InvalidSettingsError("memwrap.save got a sharded (FSDP2/DTensor) model; checkpoint it with "
                                   "torch.distributed.checkpoint (get_state_dict + dcp.save) as docs/retrofit.md shows, "
                                   "then memwrap.sync(optimizer) after loading.")
    plan = require_wrapped(model, "save").plan
    final = os.path.abspath(os.fspath(directory))
    if os.path.isfile(final):
        raise InvalidSettingsError(f"{final!r} is a file; memwrap.save needs a directory path.")
    recover(final)
    if os.path.isdir(final) and os.listdir(final) and not os.path.exists(os.path.join(final, PLAN_NAME)):
        raise InvalidSettingsError(f"{final!r} is a non-empty directory that memwrap.save did not write; memwrap.save replaces "
                                   "the whole directory, so pass a new or empty directory.")
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)
    except OSError as e:
        raise _write_error(final, e) from e
    try:
        _write_weights(model, tmp)
        _stage("weights")
        plan.save(os.path.join(tmp, PLAN_NAME))
        write_state(model, tmp)
        if optimizer is not None:
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            atomic_write_bytes(os.path.join(tmp, OPTIMIZER_NAME), buffer.getvalue())
        _stage("optimizer")
        write_manifest(tmp)
        _stage("manifest")
        _fsync_tree(tmp)
        old = final + ".old"
        if os.path.isdir(final):
            os.rename(final, old)
        _stage("between-renames")
        os.rename(tmp, final)
        _fsync_dir(parent)
        _stage("renamed")
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(final)  # an error between the two renames: put the previous checkpoint back now
        if isinstance(e, OSError) or _is_write_error(e):
            raise _write_error(final, e) from e
        raise
    return final


def _require_path(directory, verb: str) -> None:
    if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
        raise InvalidSettingsError(f"memwrap.{verb} takes a checkpoint directory path (str or os.PathLike), got "
                                   f"{directory!r}.")


def _is_write_error(e: BaseException) -> bool:
    """safetensors reports a failed write as its own error type (SafetensorError), not as an OSError."""
    return type(e).__name__ == "SafetensorError" or isinstance(e.__cause__ or e.__context__, OSError)


def _write_error(final: str, e: BaseException) -> CheckpointWriteError:
    what = getattr(e, "strerror", None) or str(e)
    where = getattr(e, "filename", None) or final
    return CheckpointWriteError(f"memwrap.save could not write {where!r} ({what}) while saving checkpoint {final!r}; "
                                "check that the parent directory exists, is writable and has free space. The previous "
                                "checkpoint there, if any, is untouched.")


def load_plan(directory: str | os.PathLike):
    """The Plan saved in a checkpoint directory."""
    _require_path(directory, "load_plan")
    recover(directory)
    verify(directory, (PLAN_NAME,))
    return _read_plan(directory)


def _read_plan(directory: str | os.PathLike):
    """The plan file of a recovered, verified checkpoint directory."""
    path = os.path.join(os.fspath(directory), PLAN_NAME)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"{path!r} does not exist; save checkpoints with memwrap.save(model, dir), or write the plan beside "
            f"save_pretrained output with memwrap.get_plan(model).save(dir + '/{PLAN_NAME}').")
    try:
        return Plan.load(path)
    except (PlanMismatchError, InvalidSettingsError, OSError, UnicodeDecodeError) as e:
        cls = CheckpointVersionError if "newer memwrap" in str(e) or "format" in str(e) else CheckpointCorruptError
        raise cls(f"{path!r} cannot be read as a memwrap plan: {e}") from e


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(single):
        return _load_safetensors(single)
    shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not shards:
        raise CheckpointNotFoundError(f"no .safetensors weights in {directory!r}; was it written by memwrap.save or "
                                      "save_pretrained?")
    state: dict[str, torch.Tensor] = {}
    for name in shards:
        state.update(_load_safetensors(os.path.join(directory, name)))
    return state


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: the file is damaged, whatever the type
        raise CheckpointCorruptError(f"{path!r} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                                     "truncated or damaged. Nothing was loaded; load an earlier checkpoint.") from e


def load(model: nn.Module, directory: str | os.PathLike, **wrap_kwargs):
    """Load a checkpoint's weights into `model` and wrap it with the saved plan (if it is not wrapped yet).

    Returns the Plan. Then build the optimizer over the wrapped model and call `load_optimizer(optimizer, directory)`.
    """
    from ..api import get_plan, wrap

    require_module(model, "load")
    _require_path(directory, "load")
    directory = os.path.abspath(os.fspath(directory))
    recover(directory)
    verify(directory)  # every file, before anything is read into the model
    plan = _read_plan(directory)
    if is_wrapped(model) and _settings(get_plan(model)) != _settings(plan):
        raise CheckpointMismatchError(f"{type(model).__name__} is already wrapped with other settings than the checkpoint's plan "
                                      f"in {directory!r}; call memwrap.unwrap(model) first, or load into an unwrapped model.")
    state = _read_weights(directory)
    own = model.state_dict()
    if plan.weights != "keep" and not is_wrapped(model):  # 8-bit W: the values and scales load into the wrapped layers
        own.update(_scale_keys(model, plan, own))
    missing = [k for k in own if k not in state and not is_tied_duplicate(model, k, state)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and own[k] is not None and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(f"checkpoint {directory!r} does not match {type(model).__name__}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}; load it into the model (class and "
                              "config) it was saved from.")
    if not is_wrapped(model):
        try:
            check_plan_against_model(model, plan)
        except PlanMismatchError as e:
            raise CheckpointMismatchError(f"the plan of checkpoint {directory!r} does not fit {type(model).__name__}: "
                                          f"{e}") from e
    if plan.weights != "keep" and not is_wrapped(model):
        wrap(model, plan=plan, **wrap_kwargs)  # first: the saved 8-bit values and scales replace what it quantized
    model.load_state_dict(state, strict=False)
    if not is_wrapped(model):
        wrap(model, plan=plan, **wrap_kwargs)
    read_state(model, directory)
    return plan


def _scale_keys(model: nn.Module, plan, own: dict) -> dict:
    """The state-dict keys of the scales an 8-bit plan adds to the unwrapped `model` (shapes checked after wrap)."""
    from ..compress import quant
    from ..compress.loss import output_head

    modules = dict(model.named_modules())
    head = output_head(model)
    keys = {}
    for lp in plan.layers:
        if lp.kind == "experts":
            mod_name, _, pname = lp.name.rpartition(".")
            keys[f"{mod_name}.{quant.expert_scale(pname)}"] = None
        elif modules.get(lp.name) is not head:
            keys[f"{lp.name}.{quant.LINEAR_SCALE}"] = None
    return keys


def write_state(model: nn.Module, directory: str) -> None:
    """memwrap_state.json: the step counter of every wrapped weight (decides its P), by layer name."""
    steps = {u.layer_name: u.steps for u in units_of(model)}
    atomic_write_text(os.path.join(directory, STATE_NAME),
                      json.dumps({"format_version": STATE_FORMAT_VERSION, "steps": steps}, indent=1))


def read_state(model: nn.Module, directory: str | os.PathLike) -> bool:
    """Restore the step counters from memwrap_state.json; False when the checkpoint has none (memwrap 0.1.0 kept
    them in the optimizer state, which `load_optimizer` reads)."""
    path = os.path.join(os.fspath(directory), STATE_NAME)
    if not os.path.exists(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        steps = {str(k): int(v) for k, v in data["steps"].items()}
        version = data.get("format_version")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointCorruptError(f"{path!r} is not a memwrap state file ({e}); save the checkpoint again with "
                                     "memwrap.save.") from e
    if version != STATE_FORMAT_VERSION:
        raise CheckpointVersionError(f"{path!r} has format {version!r}, not {STATE_FORMAT_VERSION}; it was written by "
                                     "another memwrap version: load it with that version, or upgrade memwrap.")
    units = units_of(model)
    unknown = sorted(set(steps) - {u.layer_name for u in units})
    if unknown:
        raise CheckpointMismatchError(f"{path!r} names layers this wrapped model does not have ({unknown[:3]}); load "
                                      "the checkpoint into the model it was saved from.")
    for unit in units:
        if unit.layer_name in steps:
            unit.set_steps(steps[unit.layer_name])
    return True


def _settings(plan) -> tuple:
    """What decides the projections and the update: per-layer (name, c, r, group), seed, kind, refresh period, and how
    the weights are stored (their dtype, int8, fp8)."""
    return (tuple((lp.name, lp.c, lp.r, lp.group) for lp in plan.layers), plan.seed, plan.projection, plan.refresh_every,
            plan.share_inputs, plan.weights)


def is_tied_duplicate(model: nn.Module, key: str, state) -> bool:
    """safetensors stores a tied tensor once; the other name is filled by the tie. `state`: the names that were
    loaded (a state dict's keys, or a set of names)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and any(params.get(k) is p for k in state)


def load_optimizer(optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """`optimizer.load_state_dict(torch.load(optimizer.pt, weights_only=True))`, then restore each layer's P index."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidSettingsError(f"memwrap.load_optimizer takes the optimizer built over the wrapped model (a "
                                   f"torch.optim.Optimizer), got {type(optimizer).__name__}.")
    _require_path(directory, "load_optimizer")
    recover(directory)
    verify(directory, (OPTIMIZER_NAME,))
    path = os.path.join(os.fspath(directory), OPTIMIZER_NAME)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path!r} does not exist; pass optimizer= to memwrap.save to checkpoint the "
                                      "optimizer.")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{path!r} is not a readable optimizer state ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated or damaged. Load "
                                     "an earlier checkpoint.") from e
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointMismatchError(f"{path!r} was saved from another optimizer than {type(optimizer).__name__} over "
                                      f"these parameters ({e}); build the optimizer the checkpoint was saved with "
                                      "(same kind, same parameter groups) before load_optimizer.") from e
    sync(optimizer)
