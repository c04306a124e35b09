"""Where the memory budget comes from: NVML, else torch.cuda.mem_get_info, else psutil (CPU RAM).

Each probe names its source; a source that fails (no driver, no device, no package) is skipped and the
reason kept, so `memwrap env` and planner notes can say why the budget came from where it did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MARGIN_FRACTION = 0.10  # keep 10% of free memory (and at least 1 GB on a GPU) for the allocator / CUDA context
GPU_MIN_MARGIN_BYTES = 1 << 30


@dataclass(frozen=True)
class MemoryProbe:
    """Free and total bytes of one device, and which source said so."""

    source: str  # "nvml" | "torch.cuda" | "psutil"
    device: str  # "cuda:0" | "cpu"
    free_bytes: int
    total_bytes: int
    name: str = ""
    fallback_reasons: tuple[str, ...] = field(default=())  # why earlier sources were not used

    def budget_bytes(self, margin_fraction: float = DEFAULT_MARGIN_FRACTION) -> int:
        """Free bytes minus a safety margin (10%, and at least 1 GB on a GPU)."""
        margin = int(self.free_bytes * margin_fraction)
        if self.device != "cpu":
            margin = max(margin, GPU_MIN_MARGIN_BYTES)
        return max(0, self.free_bytes - margin)


def device_in_use() -> tuple[int, str]:
    """(the CUDA index this process computes on, the NVML name of that GPU: a physical index or a UUID).

    torch.cuda.current_device() when CUDA is initialised, else LOCAL_RANK (torchrun), else 0; NVML numbers GPUs
    physically, so the CUDA index goes through CUDA_VISIBLE_DEVICES.
    """
    import os

    index = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            index = torch.cuda.current_device()
    except Exception:  # noqa: BLE001  (a broken CUDA install: fall back to the environment)
        index = None
    if index is None:
        local_rank = os.environ.get("LOCAL_RANK", "")
        index = int(local_rank) if local_rank.isdigit() else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return index, (visible[index] if index < len(visible) else str(index))


def probe_nvml(index: int | str = 0) -> MemoryProbe:
    """NVML (nvidia-ml-py) free/total of one GPU: a physical index, or a UUID ("GPU-…") as CUDA_VISIBLE_DEVICES
    may name it; raises RuntimeError with the reason when unavailable."""
    try:
        import pynvml
    except ImportError as e:
        raise RuntimeError(f"nvidia-ml-py is not installed ({e})") from e
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001  (NVMLError_LibraryNotFound, DriverNotLoaded, ...)
        raise RuntimeError(f"NVML init failed: {e}") from e
    try:
        if str(index).isdigit():
            if pynvml.nvmlDeviceGetCount() <= int(index):
                raise RuntimeError(f"NVML sees no GPU {index}")
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(index))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(str(index))
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        return MemoryProbe("nvml", f"cuda:{index}", int(info.free), int(info.total), name)
    except RuntimeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"NVML query failed: {e}") from e
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def probe_torch_cuda(index: int = 0) -> MemoryProbe:
    """torch.cuda.mem_get_info of GPU `index`; raises RuntimeError when CUDA is not available."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda is not available")
    free, total = torch.cuda.mem_get_info(index)
    return MemoryProbe("torch.cuda", f"cuda:{index}", int(free), int(total), torch.cuda.get_device_name(index))


def probe_psutil() -> MemoryProbe:
    """Available and total system RAM (the CPU device)."""
    import psutil

    vm = psutil.virtual_memory()
    return MemoryProbe("psutil", "cpu", int(vm.available), int(vm.total), "system RAM")


def probe(index: int | None = None) -> MemoryProbe:
    """The first source that answers for the GPU this process uses (`device_in_use`, or CUDA `index`): NVML,
    torch.cuda, psutil. Reasons for skipped sources are kept."""
    reasons = []
    cuda_index, nvml_name = device_in_use() if index is None else (index, str(index))
    for fn, arg in ((probe_nvml, nvml_name), (probe_torch_cuda, cuda_index)):
        try:
            got = fn(arg)
        except RuntimeError as e:
            reasons.append(f"{fn.__name__.removeprefix('probe_')}: {e}")
            continue
        return MemoryProbe(got.source, f"cuda:{cuda_index}", got.free_bytes, got.total_bytes, got.name, tuple(reasons))
    got = probe_psutil()
    return MemoryProbe(got.source, got.device, got.free_bytes, got.total_bytes, got.name, tuple(reasons))


def environment() -> dict[str, object]:
    """What a bug report needs: versions, devices, NVML free/total, RAM."""
    import platform
    import sys

    import psutil
    import torch

    from ..versions import standing

    info: dict[str, object] = {"python": sys.version.split()[0], "platform": platform.platform(),
                               "torch": torch.__version__, "torch support": standing("torch", torch.__version__),
                               "cuda (torch build)": torch.version.cuda or "none",
                               "cuda available": torch.cuda.is_available()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
        info["transformers support"] = standing("transformers", transformers.__version__)
    except ImportError:
        info["transformers"] = "not installed"
    try:
        from importlib.metadata import version

        info["memwrap"] = version("memwrap")
    except Exception:  # noqa: BLE001
        info["memwrap"] = "unknown"
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        nv = probe_nvml()
        info["nvml"] = f"{nv.name}: {nv.free_bytes / 1e9:.2f} GB free of {nv.total_bytes / 1e9:.2f} GB"
    except RuntimeError as e:
        info["nvml"] = f"unavailable ({e})"
    vm = psutil.virtual_memory()
    info["ram"] = f"{vm.available / 1e9:.2f} GB available of {vm.total / 1e9:.2f} GB"
    info["cpu cores"] = psutil.cpu_count()
    chosen = probe()
    info["budget source"] = f"{chosen.source} ({chosen.device}), default budget {chosen.budget_bytes() / 1e9:.2f} GB"
    return info
