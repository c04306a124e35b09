"""The update path: every update that reaches coords reaches the dense weight exactly once, or a clear error says why.

Manual loops, master-copy write-backs, optimizers built before wrap, skipped parameters, GradScaler skips, Adafactor
without lr, first moments of every optimizer kind, garbage-collected models, pickling, ZeroRedundancyOptimizer."""

import copy
import json
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from test_ddp import once_per_run, torchrun
from test_moe import full_rank
from tiny import state_equal, tiny_llama, token_batch
from torch import nn

import memwrap
from memwrap.compress import merge
from memwrap.compress.linear import CompressedLinear


def full_rank_llama(seed=0):
    model = tiny_llama(seed=seed)
    memwrap.wrap(model, plan=full_rank(memwrap.wrap(tiny_llama(seed=seed), rank=4, granularity=2)))
    return model


def batch(step):
    return token_batch(seed=300 + step % 3)


def compressed(model):
    return [m for m in model.modules() if isinstance(m, CompressedLinear)]


def relative_gap(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# ---- updates that do not come from a torch optimizer -----------------------------------------------------------
def manual_sgd(model, steps, lr=1.0):
    """The tutorial loop: p.add_(p.grad, alpha=-lr) over model.parameters() under no_grad."""
    losses = []
    for step in range(steps):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
        model.zero_grad()
        losses.append(loss.item())
    return losses


def test_manual_sgd_loop_at_full_rank_equals_the_plain_model():
    plain, wrapped = tiny_llama(), full_rank_llama()
    ref, got = manual_sgd(plain, 5), manual_sgd(wrapped, 5)
    assert relative_gap(got, ref) < 1e-3
    assert got[-1] < got[0] - 0.05  # it trained
    wrapped(input_ids=batch(0))  # the last update is merged by the next forward
    memwrap.unwrap(wrapped)
    diffs = [(a - b).abs().max().item() for a, b in zip(plain.state_dict().values(), wrapped.state_dict().values())]
    assert max(diffs) < 1e-4


def test_manual_loop_update_reaches_the_weight_once_at_the_next_forward():
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=2)
    layer = compressed(model)[0]
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    w0 = layer.weight.detach().clone()
    delta = -0.1 * layer.coords.grad
    with torch.no_grad():
        layer.coords.add_(delta)
    expected = w0 + layer.lifted(delta)
    for _ in range(2):  # a second forward merges nothing more
        with torch.no_grad():
            model(input_ids=ids)
        assert torch.allclose(layer.weight, expected, atol=1e-6, rtol=0)
        assert torch.equal(layer.coords, delta)  # kept: a master copy writing its running total back stays exact
    assert layer.steps == 1
    expected = expected + layer.lifted(delta)  # under the P of step 1 (the merge of step 2 refreshes it)
    with torch.no_grad():
        layer.coords.add_(delta)  # the next update: only the difference is merged
        model(input_ids=ids)
    assert torch.allclose(layer.weight, expected, atol=1e-6, rtol=0)
    assert (layer.steps, layer.refresh_index) == (2, 1)


def test_flat_master_copy_written_back_with_copy_is_merged():
    """The ZeRO / mixed-precision pattern: an fp32 master copy stepped elsewhere, copied back into the parameters."""
    def run(model, steps=4):
        params = [p for p in model.parameters() if p.requires_grad]
        master = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(master, lr=3e-3, weight_decay=0.0)
        losses = []
        for step in range(steps):
            ids = batch(step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            for m, p in zip(master, params, strict=True):
                m.grad = p.grad.detach().clone()
            opt.step()
            with torch.no_grad():
                for m, p in zip(master, params, strict=True):
                    p.copy_(m)
            model.zero_grad()
            losses.append(loss.item())
        return losses

    ref = run(tiny_llama())
    got = run(full_rank_llama())  # the same scheme, unchanged: coords' master copies hold running totals
    assert relative_gap(got, ref) < 1e-3
    assert got[-1] < got[0]


def test_writes_autograd_cannot_see_raise_at_the_next_forwards():
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            p.data.add_(p.grad, alpha=-0.01)  # .data: no version counter moves
    with pytest.raises(memwrap.UnmergedUpdateError, match="no_grad"):
        for _ in range(3):
            model(input_ids=ids)


# ---- optimizers ---------------------------------------------------------------------------------------------
def test_optimizer_built_before_wrap_raises_at_its_first_step_and_changes_nothing():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    memwrap.wrap(model, rank=4, granularity=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(memwrap.OptimizerBeforeWrapError, match="after memwrap.wrap"):
        opt.step()
    assert state_equal(model.state_dict(), before)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # the fix the message names
    opt.step()
    assert not state_equal(model.state_dict(), before)


@pytest.mark.parametrize("kwargs", [{}, {"foreach": True}, {"fused": True}])
def test_adamw_with_weight_decay_at_full_rank_equals_plain_adamw(kwargs):
    """Decoupled weight decay reaches the dense weight exactly as plain AdamW applies it (foreach and fused too)."""
    plain, wrapped = tiny_llama(), full_rank_llama()
    for model in (plain, wrapped):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5, **kwargs)
        for step in range(3):
            ids = batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for (k, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), k


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, use_b):
        return self.b(self.a(x)) if use_b else self.a(x)


@pytest.mark.parametrize("kwargs", [{}, {"fused": True}])
def test_parameter_without_gradient_is_not_merged_decayed_or_counted(kwargs):
    """A branch that got no gradient (an unrouted MoE layer): AdamW skips it, so must memwrap; no KeyError later."""
    model = TwoBranches()
    memwrap.wrap(model, rank=4, granularity=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
    b_weight = model.b.weight.detach().clone()
    x = torch.randn(8, 16)
    model(x, use_b=False).square().sum().backward()
    opt.step()
    opt.zero_grad()
    assert torch.equal(model.b.weight, b_weight)  # not decayed
    assert (model.a.steps, model.b.steps) == (1, 0)
    assert model.b.coords not in opt.state  # no half-made entry memwrap left behind
    model(x, use_b=True).square().sum().backward()
    opt.step()  # torch AdamW would raise KeyError: 'exp_avg' on a half-made state
    assert (model.a.steps, model.b.steps) == (2, 1)
    assert not torch.equal(model.b.weight, b_weight)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skipped_step_leaves_weights_and_counters_alone(fused):
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    layers = compressed(model)
    ids = batch(0)
    scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
    layers[0].coords.grad[0, 0, 0] = float("inf")
    before = [m.weight.detach().clone() for m in layers]
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, before, strict=True))
    assert {(m.steps, m.refresh_index) for m in layers} == {(0, 0)}
    scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
    scaler.step(opt)
    scaler.update()
    assert {(m.steps, m.refresh_index) for m in layers} == {(1, 1)}
    assert all(not torch.equal(m.weight, w) for m, w in zip(layers, before, strict=True))


def test_adafactor_without_lr_trains_and_warns_once_that_weight_decay_is_not_applied():
    from transformers.optimization import Adafactor

    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=3)
    opt = Adafactor(model.parameters(), lr=None, relative_step=True, scale_parameter=False, warmup_init=False,
                    weight_decay=0.01, beta1=0.9)
    layer = compressed(model)[0]
    w0 = layer.weight.detach().clone()
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            ids = batch(0)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    decay_warnings = [w for w in caught if "weight_decay" in str(w.message)]
    assert len(decay_warnings) == 1
    assert losses[-1] < losses[0] - 0.1
    assert not torch.equal(layer.weight, w0) and layer.steps == 8 and layer.refresh_index == 2


# ---- first moments --------------------------------------------------------------------------------------------
class Lion(torch.optim.Optimizer):
    """A minimal Lion (sign of interpolated momentum), as lion-pytorch keeps it: state['exp_avg']."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99)):
        super().__init__(params, dict(lr=lr, betas=betas))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class Unknown(torch.optim.Optimizer):
    """An optimizer memwrap has no table entry for, with a momentum under a name of its own."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    v = self.state[p].setdefault("velocity", torch.zeros_like(p))
                    v.mul_(0.9).add_(p.grad)
                    p.add_(v, alpha=-group["lr"])


def adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, beta1=0.9)


KINDS = {  # optimizer -> the state entries that hold its first moment
    "AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), {"exp_avg"}),
    "NAdam": (lambda ps: torch.optim.NAdam(ps, lr=1e-3), {"exp_avg"}),
    "SGD": (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), {"momentum_buffer"}),
    "RMSprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
                {"momentum_buffer", "grad_avg"}),
    "Adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=1e-3), set()),
    "Adafactor (transformers, beta1)": (adafactor, {"exp_avg"}),
    "Lion": (lambda ps: Lion(ps), {"exp_avg"}),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_first_moment_table_carries_exactly_the_first_moment(kind):
    """carry_first_moment maps each first-moment state m -> m @ T and leaves every other state entry untouched."""
    make, keys = KINDS[kind]
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    opt = make([p for p in model.parameters() if p.requires_grad])
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    p = compressed(model)[0].coords
    before = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    assert keys <= set(before)
    t = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known kind never warns
        merge.carry_first_moment(opt, p, t)
    for k, v in before.items():
        expected = v @ t if k in keys else v
        assert torch.allclose(opt.state[p][k], expected, atol=1e-6), k


def test_unknown_optimizer_warns_once_at_refresh_and_register_first_moment_teaches_it():
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=1)
    opt = Unknown(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            ids = batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    stale = [w for w in caught if "register_first_moment" in str(w.message)]
    assert len(stale) == 1 and "velocity" in str(stale[0].message)
    memwrap.register_first_moment("Unknown", ["velocity"], module=__name__)
    try:
        p = compressed(model)[0].coords
        before = opt.state[p]["velocity"].clone()
        t = 2 * torch.eye(4)
        merge.carry_first_moment(opt, p, t)
        assert torch.allclose(opt.state[p]["velocity"], 2 * before)
    finally:
        merge.FIRST_MOMENTS.pop(0)


def test_bitsandbytes_8bit_first_moment_is_carried():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    try:
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=0)
        ids = batch(0)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        pytest.skip(f"bitsandbytes 8-bit optimizers do not run on this machine: {e}")
    p = compressed(model)[0].coords
    import bitsandbytes.functional as bnbf

    state = opt.state[p]
    m = bnbf.dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=256)
    merge.carry_first_moment(opt, p, -torch.eye(4))
    m2 = bnbf.dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=256)
    assert torch.allclose(m2, -m, atol=2e-2 * m.abs().max().item())


# ---- lifetime: no hooks once no wrapped model lives; copies ------------------------------------------------------
def test_adafactor_scaled_by_parameter_rms_warns_that_wrapped_layers_get_eps_sized_steps():
    from transformers.optimization import Adafactor

    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    opt = Adafactor(model.parameters(), lr=None, relative_step=True, scale_parameter=True)
    model(input_ids=batch(0), labels=batch(0)).loss.backward()
    with pytest.warns(UserWarning, match="scale_parameter=False"):
        opt.step()


GC_SCRIPT = """
import gc, sys, torch, torch.optim.optimizer as o
sys.path.insert(0, {tests!r})
from tiny import tiny_llama, token_batch
from transformers.optimization import Adafactor
import memwrap
from memwrap.compress import merge
ids = token_batch()
model = tiny_llama()
memwrap.wrap(model, rank=4, granularity=2)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(input_ids=ids, labels=ids).loss.backward()
opt.step()
print(len(o._global_optimizer_pre_hooks), len(opt._optimizer_step_post_hooks), merge.hook_installed())
del model
gc.collect()
print(len(o._global_optimizer_pre_hooks), len(opt._optimizer_step_post_hooks), merge.hook_installed())
plain = tiny_llama()
plain_opt = Adafactor(plain.parameters(), lr=None, relative_step=True, weight_decay=0.01)
plain(input_ids=ids, labels=ids).loss.backward()
plain_opt.step()  # 0.1.0 crashed here: float(None) in the hook a garbage-collected model left behind
print("stepped")
"""


def test_no_memwrap_code_runs_in_optimizer_steps_after_the_wrapped_model_is_garbage_collected():
    import os

    code = GC_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["1", "1", "True", "0", "0", "False", "stepped"], out.stderr[-2000:]


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copy_after_a_training_forward_trains_and_unwraps_like_the_original(tmp_path, how):
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):  # crosses a refresh; leaves the input caches filled by a training forward
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model(input_ids=batch(0), labels=batch(0))
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        torch.save(model, tmp_path / "model.pt")
        twin = torch.load(tmp_path / "model.pt", weights_only=False)
    assert [m.steps for m in compressed(twin)] == [m.steps for m in compressed(model)]
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares AdamW's step tensors otherwise
    losses = {}
    for name, m, o in (("original", model, opt), ("copy", twin, opt_twin)):
        losses[name] = []
        for step in range(3, 6):
            ids = batch(step)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            o.step()
            o.zero_grad()
            losses[name].append(loss.item())
    assert losses["copy"] == losses["original"]
    memwrap.unwrap(model)
    memwrap.unwrap(twin)
    assert state_equal(model.state_dict(), twin.state_dict())
    assert not any(isinstance(m, CompressedLinear) for m in twin.modules())


def test_input_cache_follows_the_refresh_index():
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    group = compressed(model)[0].group
    x = torch.randn(6, group.in_features)
    a, b = group.compress(x, torch.float32, 0), group.compress(x, torch.float32, 1)
    assert torch.allclose(a, (x.reshape(-1, group.d) @ group.projection(0)).reshape(6, group.c, group.r))
    assert torch.allclose(b, (x.reshape(-1, group.d) @ group.projection(1)).reshape(6, group.c, group.r))
    assert not torch.allclose(a, b)


# ---- ZeroRedundancyOptimizer -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero_result(tmp_path_factory):
    import os

    out = once_per_run(tmp_path_factory, "zero", lambda d: torchrun(os.path.join(os.path.dirname(__file__),
                                                                                 "dist_zero.py"), d / "zero.json", 5))
    with open(out / "zero.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_zero_redundancy_optimizer_at_full_rank_equals_plain_zero(zero_result):
    plain, full = zero_result["plain"], zero_result["full-rank"]
    assert relative_gap(full["losses"], plain["losses"]) < 1e-5
    for kind in ("full-rank", "compressed"):
        ranks = zero_result[kind]["weights_per_rank"]
        assert ranks[0] == ranks[1], kind  # every rank merged every update


@pytest.mark.slow
def test_zero_redundancy_optimizer_compressed_equals_single_process_adamw(zero_result):
    from dist_zero import GLOBAL_BATCH, build, global_batch

    model = build("compressed")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
    losses = []
    for step in range(5):
        ids = global_batch(step)
        assert ids.shape[0] == GLOBAL_BATCH
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert relative_gap(zero_result["compressed"]["losses"], losses) < 1e-5
    assert losses[-1] < losses[0]


def test_importing_memwrap_installs_no_hook():
    code = ("import torch.optim.optimizer as o, memwrap; "
            "print(len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "0"], out.stderr


@pytest.mark.parametrize("args", [dict(names=[], keys=["m"]), dict(names=None, keys=["m"]), dict(names="X", keys=None),
                                  dict(names=["X", 3], keys=["m"]), dict(names="X", keys=["m"], module=None),
                                  dict(names="X", keys=["m"], carry="not a function")])
def test_register_first_moment_checks_its_arguments(args):
    before = list(memwrap.compress.merge.FIRST_MOMENTS)
    with pytest.raises(memwrap.errors.InvalidSettingsError):
        memwrap.register_first_moment(**args)
    assert memwrap.compress.merge.FIRST_MOMENTS == before  # nothing registered
