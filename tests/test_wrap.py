"""wrap / unwrap: state dict keys, bit-exact round trip, filters, skipped layers, errors leave the model untouched."""

import json
import subprocess
import sys

import pytest
import torch
from tiny import state_equal, tiny_llama, token_batch
from torch import nn

import memwrap
from memwrap.compress import merge
from memwrap.compress.linear import CompressedLinear


def snapshot(model):
    """Everything an error must not change: classes, tensors, requires_grad flags."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_untouched(model, snap):
    mods, sd, flags = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    assert state_equal(model.state_dict(), sd)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert not hasattr(model, "_memwrap_state")


def test_state_dict_keys_equal_original_and_load_both_ways():
    plain, wrapped = tiny_llama(), tiny_llama()
    memwrap.wrap(wrapped, rank=4, granularity=2)
    assert list(wrapped.state_dict().keys()) == list(plain.state_dict().keys())
    wrapped.load_state_dict(plain.state_dict())  # strict: coords absent is fine
    plain.load_state_dict(wrapped.state_dict())


def test_wrap_unwrap_roundtrip_is_bit_exact_and_restores_modules():
    model, ref = tiny_llama(), tiny_llama()
    ids = [id(p) for p in model.parameters()]
    classes = [type(m) for m in model.modules()]
    memwrap.wrap(model, rank=4, granularity=2)
    assert merge.hook_installed()
    memwrap.unwrap(model)
    assert state_equal(model.state_dict(), ref.state_dict())
    assert [id(p) for p in model.parameters()] == ids
    assert [type(m) for m in model.modules()] == classes
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m in merge._UNITS for m in model.modules())


def test_optimizer_hooks_are_removed_when_the_last_model_is_unwrapped():
    """One global pre-hook while a wrapped model lives; an optimizer's own post-hook after its first step; none after
    unwrap (nor when the optimizer outlives the model)."""
    code = ("import torch.optim.optimizer as o, memwrap, torch; m = torch.nn.Sequential(torch.nn.Linear(8, 8)); "
            "memwrap.wrap(m, rank=2, granularity=2); a = len(o._global_optimizer_pre_hooks); "
            "opt = torch.optim.AdamW(m.parameters()); m(torch.ones(2, 8)).sum().backward(); opt.step(); "
            "b = len(opt._optimizer_step_post_hooks); memwrap.unwrap(m); "
            "print(a, b, len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks), "
            "len(opt._optimizer_step_post_hooks))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "1", "0", "0", "0"], out.stderr


def test_deepcopy_of_a_wrapped_model_trains_like_the_original():
    import copy

    a = tiny_llama()
    memwrap.wrap(a, rank=4, granularity=2)
    b = copy.deepcopy(a)
    ids = token_batch()
    for m in (a, b):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(2):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    assert state_equal(a.state_dict(), b.state_dict())
    assert all(torch.count_nonzero(m.coords) == 0 for m in b.modules() if isinstance(m, CompressedLinear))


def test_unwrap_after_training_keeps_the_trained_weights_and_logits():
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = token_batch()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    memwrap.unwrap(model)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert state_equal(model.state_dict(), trained)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())


def test_default_targets_every_linear_but_lm_head_and_plan_lists_them():
    model = tiny_llama(layers=2)
    plan = memwrap.wrap(model, rank=4, granularity=2)
    linears = [n for n, m in tiny_llama(layers=2).named_modules() if isinstance(m, nn.Linear)]
    assert [lp.name for lp in plan.layers] == [n for n in linears if n != "lm_head"]
    assert all((lp.c, lp.r) == (2, 4) for lp in plan.layers)
    text = str(plan)
    assert "model.layers.1.mlp.down_proj" in text and "lm_head" not in text
    # gradient bytes the plan reports are the coords' real sizes
    coords = sum(m.coords.numel() * 4 for m in model.modules() if isinstance(m, CompressedLinear))
    assert plan.grad_bytes(True) == coords


@pytest.mark.parametrize("targets,exclude,expected", [
    (["q_proj", "v_proj"], ["lm_head"], {"q_proj", "v_proj"}),
    (["layers.*.mlp.*"], ["lm_head"], {"gate_proj", "up_proj", "down_proj"}),
    (None, ["lm_head", "mlp"], {"q_proj", "k_proj", "v_proj", "o_proj"}),
])
def test_target_and_exclude_filters(targets, exclude, expected):
    model = tiny_llama()
    plan = memwrap.wrap(model, rank=4, granularity=2, targets=targets, exclude=exclude)
    assert {lp.name.rsplit(".", 1)[1] for lp in plan.layers} == expected
    assert len(plan.layers) == 2 * len(expected)


def test_tied_and_frozen_linears_are_skipped_and_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.tied = nn.Linear(16, 10, bias=False)
            self.tied.weight = self.emb.weight
            self.frozen = nn.Linear(16, 16)
            self.frozen.weight.requires_grad_(False)
            self.ok = nn.Linear(16, 16)

    model = M()
    plan = memwrap.wrap(model, rank=2, granularity=2, exclude=())
    assert [lp.name for lp in plan.layers] == ["ok"]
    reasons = dict(plan.skipped)
    assert set(reasons) == {"tied", "frozen"}
    assert "tied" in reasons["tied"] and "frozen" in reasons["frozen"]


def test_quantized_linears_are_refused_naming_the_alternative():
    """A model whose linears are quantized (here a bitsandbytes-style class; torchao below) cannot be trained by
    updating full-precision weights: refused before anything changes, with what to do; excluded, they stay frozen."""
    class Linear8bitLt(nn.Linear):  # the class name bitsandbytes uses
        pass

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = Linear8bitLt(16, 16)
            self.ok = nn.Linear(16, 16)

    model = M()
    snap = snapshot(model)
    with pytest.raises(memwrap.errors.UnsupportedArchitectureError, match="quantized.*Load the model in bf16 or fp32.*QLoRA"):
        memwrap.wrap(model, rank=2, granularity=2, exclude=())
    assert_untouched(model, snap)
    plan = memwrap.wrap(model, rank=2, granularity=2, exclude=("q",))
    assert [lp.name for lp in plan.layers] == ["ok"]


def test_torchao_quantized_model_is_refused():
    torchao = pytest.importorskip("torchao.quantization")
    model = tiny_llama().to(torch.bfloat16)
    torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
    modules, params = [(n, type(m)) for n, m in model.named_modules()], dict(model.named_parameters())
    with pytest.raises(memwrap.errors.UnsupportedArchitectureError, match="Int8Tensor weights"):
        memwrap.wrap(model, rank=4, granularity=2)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules and not hasattr(model, "_memwrap_state")
    assert all(p is params[n] for n, p in model.named_parameters())  # the quantized tensors themselves, untouched


def test_peft_model_is_refused_naming_merge_and_unload():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    snap = snapshot(model)
    with pytest.raises(memwrap.errors.UnsupportedArchitectureError, match="PEFT adapters.*merge_and_unload"):
        memwrap.wrap(model, rank=4, granularity=2)
    assert_untouched(model, snap)
    merged = model.merge_and_unload().requires_grad_(True)  # what the message says: memwrap trains the merged weights
    assert len(memwrap.wrap(merged, rank=4, granularity=2).layers) == 14


def test_a_layer_used_under_two_names_is_refused():
    """A shared layer (one module at two places): wrap would replace one use only and the other would silently stop
    training, so it is refused; excluded under all its names, it trains exactly."""
    model = tiny_llama()
    model.model.layers[1].mlp = model.model.layers[0].mlp
    snap = snapshot(model)
    with pytest.raises(memwrap.errors.UnsupportedArchitectureError, match="used at both 'model.layers.0.mlp.gate_proj' and "
                                                           "'model.layers.1.mlp.gate_proj'"):
        memwrap.wrap(model, rank=4, granularity=2)
    assert_untouched(model, snap)
    plan = memwrap.wrap(model, rank=4, granularity=2, exclude=("lm_head", "*mlp*"))
    assert plan.layers and all("mlp" not in lp.name for lp in plan.layers)


def test_plan_json_roundtrip_and_wrap_with_saved_plan_is_identical(tmp_path):
    a, b = tiny_llama(), tiny_llama()
    plan = memwrap.wrap(a, rank=4, granularity=2, seed=7, refresh_every=5)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert memwrap.Plan.load(path) == plan
    assert json.loads(path.read_text())["layers"][0]["c"] == 2
    plan_b = memwrap.wrap(b, plan=str(path))
    assert plan_b == plan
    ids = token_batch()
    for m in (a, b):
        m(input_ids=ids, labels=ids).loss.backward()
    for (na, ma), mb in zip(a.named_modules(), b.modules()):
        if isinstance(ma, CompressedLinear):
            assert torch.equal(ma.coords.grad, mb.coords.grad), na


def test_importing_memwrap_changes_nothing():
    code = ("import torch, torch.optim.optimizer as o; before = (len(o._global_optimizer_post_hooks), "
            "len(o._global_optimizer_pre_hooks), torch.nn.Linear.forward); import memwrap, memwrap.adapters; "
            "after = (len(o._global_optimizer_post_hooks), len(o._global_optimizer_pre_hooks), torch.nn.Linear.forward); "
            "print(before == after)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_wrapping_one_model_leaves_another_untouched():
    a, b = tiny_llama(), tiny_llama()
    snap = snapshot(b)
    memwrap.wrap(a, rank=4, granularity=2)
    ids = token_batch()
    opt = torch.optim.AdamW(b.parameters(), lr=1e-2)
    ref = tiny_llama()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for m, o in ((b, opt), (ref, opt_ref)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    assert state_equal(b.state_dict(), ref.state_dict())
    assert not state_equal(b.state_dict(), snap[1])


# ---- errors: each one clear, each leaves the model untouched ------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=33, granularity=2), "exceeds the block width"),
    (dict(rank=4, granularity=3), "does not divide"),
    (dict(rank=-1, granularity=2), "positive integer"),
    (dict(rank=4, granularity=0), "positive integer"),
    (dict(rank=float("nan"), granularity=2), "positive integer"),
    (dict(rank=4.0, granularity=2), "positive integer"),
    (dict(rank=4, granularity=2, refresh_every=0), "refresh_every"),
    (dict(rank=4, granularity=2, projection="svd"), "projection"),
    (dict(rank=4, granularity=2, seed=-3), "seed"),
    (dict(rank=4, granularity=2, targets=[3]), "strings"),
])
def test_invalid_settings_raise_and_leave_model_untouched(kwargs, match):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(memwrap.InvalidSettingsError, match=match):
        memwrap.wrap(model, **kwargs)
    assert_untouched(model, snap)


def test_no_targets_error_names_what_was_found():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(memwrap.NoTargetsError, match=r"nn.Linear modules found.*targets=\['nonexistent'\]"):
        memwrap.wrap(model, rank=4, granularity=2, targets=["nonexistent"])
    assert_untouched(model, snap)
    with pytest.raises(memwrap.NoTargetsError):
        memwrap.wrap(nn.Sequential(nn.Conv2d(3, 3, 3)), rank=1, granularity=1)


def test_already_wrapped_and_not_wrapped_errors():
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    snap = snapshot(model)
    with pytest.raises(memwrap.AlreadyWrappedError, match="unwrap"):
        memwrap.wrap(model, rank=4, granularity=2)
    assert [(n, type(m)) for n, m in model.named_modules()] == snap[0]
    memwrap.unwrap(model)
    with pytest.raises(memwrap.NotWrappedError, match="wrap"):
        memwrap.unwrap(model)
    with pytest.raises(memwrap.NotWrappedError):
        memwrap.optimizer(model)


def test_plan_mismatch_errors(tmp_path):
    small, big = tiny_llama(layers=1), tiny_llama(layers=2)
    plan = memwrap.wrap(big, rank=4, granularity=2)
    snap = snapshot(small)
    with pytest.raises(memwrap.PlanMismatchError, match="does not have"):
        memwrap.wrap(small, plan=plan)
    assert_untouched(small, snap)
    with pytest.raises(memwrap.InvalidSettingsError, match="either plan="):
        memwrap.wrap(small, plan=plan, rank=4)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(memwrap.PlanMismatchError, match="not valid JSON"):
        memwrap.wrap(small, plan=bad)
    with pytest.raises(memwrap.PlanMismatchError, match="does not exist"):
        memwrap.wrap(small, plan=tmp_path / "missing.json")
    assert_untouched(small, snap)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(kind="lion"), "kind"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_optimizer_settings_errors(kwargs, match):
    model = tiny_llama()
    memwrap.wrap(model, rank=4, granularity=2)
    with pytest.raises(memwrap.InvalidSettingsError, match=match):
        memwrap.optimizer(model, **kwargs)
