"""Budget probing: NVML, else torch.cuda, else psutil; reasons kept; fake NVML answers reach the planner."""

from __future__ import annotations

import sys
import types

import psutil
import pytest
import torch
from tiny import tiny_llama

import memwrap
from memwrap.planning import memory


def fake_pynvml(free: int, total: int, count: int = 1, fail_init: bool = False) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    def init():
        if fail_init:
            raise RuntimeError("Driver Not Loaded")

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: count
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(free=free, total=total, used=total - free)
    mod.nvmlDeviceGetName = lambda h: b"Fake GPU 80GB"
    return mod


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_nvml_absent_falls_back_to_psutil_with_reason(monkeypatch, no_cuda):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    got = memory.probe()
    assert got.source == "psutil" and got.device == "cpu"
    assert any(r.startswith("nvml:") and "not installed" in r for r in got.fallback_reasons)
    assert any(r.startswith("torch_cuda:") for r in got.fallback_reasons)
    avail = psutil.virtual_memory().available
    assert abs(got.free_bytes - avail) <= 0.2 * avail  # other processes move it a little
    assert got.budget_bytes() == got.free_bytes - int(got.free_bytes * memory.DEFAULT_MARGIN_FRACTION)


def test_nvml_driver_failure_falls_back_with_reason(monkeypatch, no_cuda):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(1, 2, fail_init=True))
    got = memory.probe()
    assert got.source == "psutil"
    assert any("Driver Not Loaded" in r for r in got.fallback_reasons)


def test_nvml_without_device_falls_back(monkeypatch, no_cuda):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(1, 2, count=0))
    got = memory.probe()
    assert got.source == "psutil" and any("no GPU 0" in r for r in got.fallback_reasons)


def test_fake_nvml_budget_is_used_by_wrap(monkeypatch):
    free, total = 7_000_000, 80_000_000_000
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(free, total))
    got = memory.probe()
    assert (got.source, got.free_bytes, got.total_bytes, got.name) == ("nvml", free, total, "Fake GPU 80GB")
    expected = free - max(int(free * memory.DEFAULT_MARGIN_FRACTION), memory.GPU_MIN_MARGIN_BYTES)
    assert got.budget_bytes() == max(0, expected)
    # a larger card: the planner takes its budget from NVML and the plan fits it
    big_free = 3_000_000_000
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(big_free, total))
    model = tiny_llama()
    plan = memwrap.wrap(model, batch_size=2, seq_len=32)
    assert plan.budget_bytes == big_free - memory.GPU_MIN_MARGIN_BYTES
    assert dict(plan.memory)["peak"] <= plan.budget_bytes
    assert any("nvml" in n for n in plan.notes)


def test_fake_nvml_too_small_raises_and_leaves_model_alone(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(1_100_000_000, 2_000_000_000))  # 0.1 GB after margin
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512,
                                                         num_hidden_layers=2, num_attention_heads=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(memwrap.BudgetTooSmallError) as info:
        memwrap.wrap(model, batch_size=64, seq_len=1024)
    assert info.value.min_budget_bytes > 100_000_000
    assert not memwrap.compress.inject.is_wrapped(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_environment_report_names_its_sources(monkeypatch, no_cuda):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    info = memory.environment()
    assert info["torch"] == torch.__version__
    assert info["nvml"].startswith("unavailable")
    assert "psutil" in info["budget source"]


@pytest.mark.parametrize("visible,local_rank,expected", [
    (None, None, (0, "0")),
    (None, "1", (1, "1")),
    ("2,3", "1", (1, "3")),  # torchrun rank 1 on the second visible GPU: NVML's physical GPU 3
    ("GPU-aaaa,GPU-bbbb", "0", (0, "GPU-aaaa")),
])
def test_budget_is_read_from_the_gpu_this_process_uses(monkeypatch, no_cuda, visible, local_rank, expected):
    for key, value in (("CUDA_VISIBLE_DEVICES", visible), ("LOCAL_RANK", local_rank)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert memory.device_in_use() == expected
    asked = []
    fake = fake_pynvml(7_000_000_000, 8_000_000_000, count=4)
    fake.nvmlDeviceGetHandleByIndex = lambda i: asked.append(("index", i)) or ("handle", i)
    fake.nvmlDeviceGetHandleByUUID = lambda u: asked.append(("uuid", u)) or ("handle", u)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    got = memory.probe()
    name = expected[1]
    assert asked == [("index", int(name)) if name.isdigit() else ("uuid", name)]
    assert got.source == "nvml" and got.device == f"cuda:{expected[0]}" and got.free_bytes == 7_000_000_000
