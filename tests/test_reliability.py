"""Reliability: non-finite steps (skip / raise / ignore), dtype casts after wrap, fp16 stochastic rounding."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from families import tiny
from tiny import state_equal, tiny_llama, token_batch

import memwrap
from memwrap.compress.base import stochastic_round_fp16

BATCHES = [token_batch(seed=s) for s in range(4)]


def _optimizer(model, kind):
    if kind == "memwrap":
        return memwrap.optimizer(model, lr=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model, opt, batches, poison=()):
    """One optimizer step per batch; the steps listed in `poison` get a NaN loss."""
    for i, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        if i in poison:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["memwrap", "torch"])
def test_skipped_nonfinite_step_is_a_step_never_taken(kind):
    """A NaN step under nonfinite="skip" leaves weights, optimizer state and step counters as if it never happened:
    the run equals, bit for bit, the run without that batch, and one warning counts it."""
    runs = []
    for poison in ((), (1,)):
        model = tiny_llama()
        memwrap.wrap(model, rank=4, granularity=2, refresh_every=2)
        opt = _optimizer(model, kind)
        batches = BATCHES if poison else [BATCHES[0], BATCHES[2], BATCHES[3]]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(model, opt, batches, poison)
        runs.append((model, opt, [str(w.message) for w in caught if "skipped" in str(w.message)]))
    (clean, clean_opt, clean_warn), (skipped, skipped_opt, skipped_warn) = runs
    assert state_equal(clean.state_dict(), skipped.state_dict())
    assert memwrap.skipped_steps(skipped) == 1 and memwrap.skipped_steps(clean) == 0
    assert len(skipped_warn) == 1 and "1 step(s) skipped" in skipped_warn[0] and not clean_warn
    steps = [[float(s["step"]) for s in o.state.values()] for o in (clean_opt, skipped_opt)]
    assert steps[0] == steps[1] == [3.0] * len(steps[0])
    q = [m.model.layers[0].self_attn.q_proj for m in (clean, skipped)]
    assert q[0].steps == q[1].steps == 3 and q[0].refresh_index == q[1].refresh_index == 1


@pytest.mark.parametrize("kind", ["memwrap", "torch"])
def test_nonfinite_raise_names_the_layer_and_changes_nothing(kind):
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2, nonfinite="raise")
    opt = _optimizer(model, kind)
    _train(model, opt, BATCHES[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = BATCHES[1]
    loss = model(input_ids=ids, labels=ids).loss
    (loss * torch.tensor([1.0, math.inf]).sum()).backward()
    with pytest.raises(memwrap.NonFiniteError, match="not finite") as err:
        opt.step()
    assert err.value.layer == "model.layers.0.self_attn.q_proj"  # the first wrapped layer the optimizer holds
    assert state_equal(before, model.state_dict())
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())


def test_nonfinite_ignore_is_plain_behaviour():
    """'ignore' takes the step as torch would: the NaN reaches the weights (what 'skip' prevents)."""
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2, nonfinite="ignore")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, BATCHES[:2], poison=(1,))
    assert memwrap.skipped_steps(model) == 0
    assert model.model.layers[0].self_attn.q_proj.weight.isnan().all()


def test_gradscaler_skip_stays_the_scalers():
    """GradScaler finds the inf itself and skips the step: memwrap does not count it, the scale halves, and the next
    finite step trains as usual."""
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    w0 = model.model.layers[0].mlp.up_proj.weight.clone()
    for i, ids in enumerate(BATCHES[:2]):
        loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss * (math.inf if i == 0 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            assert scaler.get_scale() == 2.0**7 and torch.equal(model.model.layers[0].mlp.up_proj.weight, w0)
    assert memwrap.skipped_steps(model) == 0
    assert model.model.layers[0].mlp.up_proj.steps == 1
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, w0)


def test_skip_warnings_are_counted_not_flooded():
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, BATCHES[:1] * 5, poison=range(5))
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert memwrap.skipped_steps(model) == 5
    assert [re.search(r"(\d+) step\(s\) skipped", m).group(1) for m in messages] == ["1", "2", "4"]


def test_nonfinite_setting_is_checked():
    model = tiny_llama()
    with pytest.raises(memwrap.InvalidSettingsError, match="nonfinite='sometimes' is unknown"):
        memwrap.wrap(model, rank=4, nonfinite="sometimes")
    assert not any("coords" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("cast", ["to", "half", "bfloat16"])
def test_dtype_cast_after_wrap_keeps_coords_float32(cast):
    """model.to(dtype) / .half() / .bfloat16() after wrap: dense weights take the dtype, the optimizer-facing coords
    stay float32 (same Parameter objects, so an optimizer built before the cast keeps them), released coords stay
    released, and training continues; .float() brings the weights back; unwrap gives a plain model of that dtype."""
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    opt = memwrap.optimizer(model, lr=1e-2)
    _train(model, opt, BATCHES[:1])
    coords = {n: p for n, p in model.named_parameters() if n.endswith("coords")}
    getattr(model, cast)(*((torch.bfloat16,) if cast == "to" else ()))
    after = dict(model.named_parameters())
    assert all(after[n] is p and p.dtype == torch.float32 and p.stride() == (0, 0, 0) for n, p in coords.items())
    assert {p.dtype for n, p in after.items() if not n.endswith("coords")} == {dtype}
    w0 = model.model.layers[0].mlp.down_proj.weight.clone()
    _train(model, opt, BATCHES[1:3])
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in coords.values())
    assert not torch.equal(w0, model.model.layers[0].mlp.down_proj.weight)
    assert torch.isfinite(model.model.layers[0].mlp.down_proj.weight).all()
    memwrap.unwrap(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any("coords" in n for n, _ in model.named_parameters())


def test_dtype_cast_keeps_fused_expert_coords_float32():
    model = tiny("qwen3_moe")
    memwrap.wrap(model, rank=4, granularity=2)
    experts = model.model.layers[0].mlp.experts
    model.bfloat16()
    names = [n for n, _ in experts.named_parameters() if "coords" in n]
    assert names and all(getattr(experts, n).dtype == torch.float32 for n in names)
    assert experts.gate_up_proj.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(getattr(experts, n).grad.dtype == torch.float32 for n in names)
    memwrap.unwrap(model)
    assert "_apply" not in experts.__dict__ and all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_fp16_stochastic_rounding_is_unbiased():
    """Monte Carlo: float32 values between two float16 neighbours (a normal and a subnormal case) round up with
    probability proportional to the distance; the mean is within 5 standard errors of the exact value, where
    round-to-nearest is off by the whole distance."""
    g = torch.Generator().manual_seed(0)
    for value, lo, hi in ((1.0 + 2**-13, 1.0, 1.0 + 2**-10), (-3 * 2**-26, -(2**-24), 0.0)):
        x = torch.full((200_000,), value)
        rounded = stochastic_round_fp16(x, g).float()
        assert set(rounded.unique().tolist()) <= {lo, hi}
        p = (value - lo) / (hi - lo)
        sem = math.sqrt(p * (1 - p) / x.numel()) * (hi - lo)
        assert abs(rounded.mean().item() - value) < 5 * sem
        assert abs(x.half().float().mean().item() - value) > 20 * sem


def test_fp16_merge_keeps_small_updates_on_average():
    """40 tiny updates merged into fp16 weights: with stochastic rounding the signed error along each update (its
    bias) stays near zero (measured 0.4%); nearest rounding drops a third of the update (measured −34%)."""
    bias = {}
    for sr in (True, False):
        model = tiny_llama()
        model.half()
        memwrap.wrap(model, rank=4, granularity=2, stochastic_rounding=sr)
        layer = model.model.layers[0].mlp.up_proj
        w0 = layer.weight.float().clone()
        for step in range(1, 41):
            layer.merge(torch.full(layer.coords.shape, 5e-6), 1.0, step)
        exact = (torch.full(layer.coords.shape, 5e-6) @ layer.group.projection(0).T).reshape(layer.weight.shape) * 40
        err = layer.weight.float() - w0 - exact
        bias[sr] = (err * exact.sign()).mean().item() / exact.abs().mean().item()
    assert abs(bias[True]) < 0.03 and bias[False] < -0.2


# ---- checkpoint faults ----------------------------------------------------------------------------------------------
def _saved(tmp_path, optimizer=True):
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, BATCHES[:1])
    return model, opt, memwrap.save(model, tmp_path / "ckpt", optimizer=opt if optimizer else None)


def _untouched_load(directory, error, match, model=None):
    """load raises `error` (a CheckpointError) naming the directory, and the model it was given is left as it was."""
    model = model if model is not None else tiny_llama(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match) as err:
        memwrap.load(model, directory)
    assert isinstance(err.value, memwrap.CheckpointError) and os.path.basename(str(directory)) in str(err.value)
    assert state_equal(before, model.state_dict()) and types == [type(m) for m in model.modules()]


def test_truncated_or_altered_files_are_caught_before_loading(tmp_path):
    _, _, ckpt = _saved(tmp_path)
    weights = os.path.join(ckpt, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    _untouched_load(ckpt, memwrap.CheckpointCorruptError, "truncated")
    altered = bytearray(data)
    altered[-5] ^= 0xFF  # same size, one bit pattern changed inside a tensor
    with open(weights, "wb") as f:
        f.write(bytes(altered))
    _untouched_load(ckpt, memwrap.CheckpointCorruptError, "SHA-256")
    os.remove(os.path.join(ckpt, "memwrap_manifest.json"))  # no manifest (a save_pretrained dir): safetensors' own check
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    _untouched_load(ckpt, memwrap.CheckpointCorruptError, "not a readable safetensors file")
    os.remove(weights)
    _untouched_load(ckpt, memwrap.CheckpointNotFoundError, "no .safetensors weights")


def test_damaged_optimizer_state_and_another_optimizer(tmp_path):
    model, opt, ckpt = _saved(tmp_path)
    path = os.path.join(ckpt, "optimizer.pt")
    good = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(good[:100])
    with pytest.raises(memwrap.CheckpointCorruptError, match="optimizer.pt.*truncated"):
        memwrap.load_optimizer(opt, ckpt)
    os.remove(os.path.join(ckpt, "memwrap_manifest.json"))
    with pytest.raises(memwrap.CheckpointCorruptError, match="not a readable optimizer state"):
        memwrap.load_optimizer(opt, ckpt)
    with open(path, "wb") as f:
        f.write(good)
    other = torch.optim.AdamW([p for n, p in model.named_parameters() if "coords" in n])  # other parameter groups
    with pytest.raises(memwrap.CheckpointMismatchError, match="another optimizer"):
        memwrap.load_optimizer(other, ckpt)


def test_missing_directory_other_model_other_plan_future_format(tmp_path):
    _untouched_load(tmp_path / "nowhere", memwrap.CheckpointNotFoundError, "does not exist")
    _, _, ckpt = _saved(tmp_path)
    _untouched_load(ckpt, memwrap.CheckpointMismatchError, "does not match", model=tiny_llama(hidden=32))
    other = tiny_llama()
    memwrap.wrap(other, rank=2, granularity=2)
    _untouched_load(ckpt, memwrap.CheckpointMismatchError, "other settings", model=other)
    manifest = os.path.join(ckpt, "memwrap_manifest.json")
    data = json.load(open(manifest))
    data["format_version"] = 99
    json.dump(data, open(manifest, "w"))
    _untouched_load(ckpt, memwrap.CheckpointVersionError, "Upgrade memwrap")
    os.remove(manifest)
    plan = json.load(open(os.path.join(ckpt, "memwrap_plan.json")))
    plan["format_version"] = 99
    json.dump(plan, open(os.path.join(ckpt, "memwrap_plan.json"), "w"))
    _untouched_load(ckpt, memwrap.CheckpointVersionError, "format")


def test_unwritable_path_raises_checkpoint_write_error(tmp_path):
    model, opt, _ = _saved(tmp_path)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(memwrap.CheckpointWriteError, match="a-file") as err:
        memwrap.save(model, tmp_path / "a-file" / "ckpt", optimizer=opt)
    assert "writable" in str(err.value)


DISK_FULL = r"""
import os, resource, signal, sys
sys.path.insert(0, sys.argv[2])
import torch, memwrap
from tiny import tiny_llama, token_batch
model = tiny_llama(); memwrap.wrap(model, rank=4, granularity=2)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ids = token_batch(); model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
memwrap.save(model, sys.argv[1], optimizer=opt)
torch.save(model.state_dict(), sys.argv[1] + "-v1.pt")
model(input_ids=ids, labels=ids).loss.backward(); opt.step()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    memwrap.save(model, sys.argv[1], optimizer=opt)
except memwrap.CheckpointWriteError as e:
    print("CheckpointWriteError:", e)
"""


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    """A save that runs out of space (a file-size limit: writes fail with EFBIG) raises CheckpointWriteError, leaves
    no temporary directory, and the previous checkpoint loads whole."""
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(ckpt), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "CheckpointWriteError:" in proc.stdout and "free space" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt-v1.pt"]
    fresh = tiny_llama(seed=3)
    memwrap.load(fresh, ckpt)
    v1 = torch.load(tmp_path / "ckpt-v1.pt", weights_only=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in v1.items())


# ---- determinism ----------------------------------------------------------------------------------------------------
def _workers(*seeds):
    """determinism_worker.py once per seed, all at once, each in a fresh process."""
    script = os.path.join(os.path.dirname(__file__), "determinism_worker.py")
    procs = [subprocess.Popen([sys.executable, script, str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1")) for seed in seeds]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_with_one_seed_train_bit_identically():
    """Two fresh processes, same seed: the same projections, losses and weights (sha256 of the bytes) after 20 steps
    with 4 refreshes of P, for memwrap.optimizer and torch AdamW, in float32 and in bf16 (stochastic-rounded merge).
    Another seed gives other projections and weights (the comparison can fail)."""
    first, second, other = _workers(7, 7, 8)
    assert set(first) == {"memwrap/float32", "memwrap/bfloat16", "adamw/float32", "adamw/bfloat16"}
    assert first == second
    for key in first:
        assert other[key]["projections"] != first[key]["projections"]
        assert other[key]["weights"] != first[key]["weights"]


def test_every_test_the_guarantees_page_names_exists():
    """docs/guarantees.md points each promise at a test: every `file::test` it names is a test function in that file
    (a `::test` alone belongs to the file named before it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "guarantees.md"), encoding="utf-8").read()
    named, current = [], None
    for match in re.finditer(r"(test_\w+\.py)(?:::(test_\w+))?|::(test_\w+)", text):
        current = match.group(1) or current
        name = match.group(2) or match.group(3)
        if name:
            named.append((current, name))
        elif match.group(1):
            named.append((current, None))
    assert len(named) >= 30
    for file, name in named:
        source = open(os.path.join(root, "tests", file), encoding="utf-8").read()
        assert name is None or re.search(rf"^def {name}\(", source, re.M), f"{file}::{name}"
