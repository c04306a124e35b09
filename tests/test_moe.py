"""Every supported family: full rank = exact AdamW, exact input gradients vs eager, loss falls, expert bytes."""

import dataclasses

import pytest
import torch
from families import CONFIGS, FUSED_MOE, tiny
from tiny import state_equal
from torch import nn

import memwrap
from memwrap.compress import experts
from memwrap.planning.measure import SavedTensorMeter


def batch(seed=0, b=2, t=16):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def train_on(model, opt, ids, steps):
    """`steps` optimizer steps on one fixed batch (language-model loss); the loss of each step."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def full_rank(plan):
    """c = 1, r = m on every weight: the identity projection, so memwrap must train exactly."""
    return dataclasses.replace(plan, layers=tuple(dataclasses.replace(lp, c=1, r=lp.in_features) for lp in plan.layers))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_full_rank_step_equals_exact_adamw_step(family):
    ref, model = tiny(family), tiny(family)
    plan = memwrap.wrap(tiny(family), rank=4, granularity=2)
    memwrap.wrap(model, plan=full_rank(plan))
    ids = batch()
    for m in (ref, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=k)  # Adam turns 1-ulp grad differences into ~1e-6


@pytest.mark.parametrize("family", FUSED_MOE)
def test_moe_input_gradients_equal_eager_and_router_is_untouched(family):
    ref, model = tiny(family), tiny(family)
    ref.set_experts_implementation("eager")
    plan = memwrap.wrap(model, rank=4, granularity=2)
    assert plan.expert_layers and all(lp.num_experts > 1 for lp in plan.expert_layers)
    routers = {n for n, m in ref.named_modules() if n.endswith((".gate", ".router")) and not n.endswith("experts.gate")}
    assert routers and not any(lp.name in routers for lp in plan.layers)
    ids = batch()
    embeds = ref.get_input_embeddings()(ids).detach()
    e1, e2 = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()
    l1 = ref(inputs_embeds=e1, labels=ids).loss
    l2 = model(inputs_embeds=e2, labels=ids).loss
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(e2.grad, e1.grad, rtol=1e-5, atol=1e-7)
    mods = dict(model.named_modules())
    for name, mod in ref.named_modules():
        if name in routers:
            assert type(mods[name]) is type(mod)
            for (pn, p), q in zip(mod.named_parameters(), mods[name].parameters()):
                assert q.requires_grad
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=f"{name}.{pn}")


@pytest.mark.parametrize("family", list(CONFIGS))
def test_loss_falls_over_30_steps_with_default_optimizer(family):
    model = tiny(family)
    memwrap.wrap(model, rank=4, granularity=2)
    opt = memwrap.optimizer(model, lr=1e-2)
    ids = batch(b=4)
    losses = train_on(model, opt, ids, 30)
    assert losses[-1] < 0.5 * losses[0], losses[::5]


def _experts_saved_bytes(model, ids):
    block = next(m for m in model.modules() if experts.is_fused_experts(m))
    meter = SavedTensorMeter(model)
    handle = block.register_forward_pre_hook(lambda m, a: (meter.__enter__(), None)[1])
    handle2 = block.register_forward_hook(lambda m, a, o: (meter.__exit__(None, None, None), None)[1])
    model(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    handle2.remove()
    return block, meter.bytes


def test_expert_block_saved_bytes_match_the_plan():
    """Saved inputs of the first experts block: S·c·r·4 bytes per fused weight (S = tokens × top_k).

    Measured as the difference to the same block at full rank (which saves S·m·4 per fused weight), so every
    other saved tensor (gate activations, routing weights, indices) cancels exactly.
    """
    ids = batch(b=4)
    model, model_full = tiny("qwen3_moe"), tiny("qwen3_moe")
    plan = memwrap.wrap(model, rank=4, granularity=2)
    memwrap.wrap(model_full, plan=full_rank(plan))
    block, compressed = _experts_saved_bytes(model, ids)
    _, full = _experts_saved_bytes(model_full, ids)
    s = ids.numel() * model.config.num_experts_per_tok
    first = [lp for lp in plan.expert_layers if lp.name.startswith(plan.expert_layers[0].name.rsplit(".", 1)[0] + ".")]
    assert len(first) == 2
    predicted_saving = sum(s * (lp.saved_input_bytes_per_token(False) - lp.saved_input_bytes_per_token(True))
                           for lp in first)
    assert full - compressed == predicted_saving
    assert predicted_saving > 0.5 * sum(s * lp.saved_input_bytes_per_token(False) for lp in first)


def test_plan_reports_experts_separately_and_unwrap_restores_everything():
    model, ref = tiny("mixtral"), tiny("mixtral")
    before = model.config._experts_implementation
    plan = memwrap.wrap(model, rank=4, granularity=2)
    assert model.config._experts_implementation == "memwrap"
    assert {lp.kind for lp in plan.expert_layers} == {"experts"} and len(plan.expert_layers) == 4
    assert "4 expert weights compressed" in plan.table()
    assert list(model.state_dict()) == list(ref.state_dict())
    memwrap.unwrap(model)
    assert model.config._experts_implementation == before
    assert state_equal(model.state_dict(), ref.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_expert_layout_raises_and_leaves_model_untouched():
    class MyMoeExperts(nn.Module):  # fused 3-D weights without transformers' experts interface
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 32, 16))
            self.down_proj = nn.Parameter(torch.randn(4, 16, 16))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(16, 16)
            self.experts = MyMoeExperts()

    model = Block()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(memwrap.UnsupportedArchitectureError, match=r"MyMoeExperts.*'experts'.*gate_up_proj"):
        memwrap.wrap(model, rank=2, granularity=2)
    assert type(model.attn) is nn.Linear and state_equal(model.state_dict(), snap)
    assert all(p.requires_grad for p in model.parameters())
    plan = memwrap.wrap(model, rank=2, granularity=2, exclude=["experts"])  # opting out is explicit and reported
    assert [lp.name for lp in plan.layers] == ["attn"]
    assert "excluded by the user" in dict(plan.skipped)["experts"]


@pytest.mark.parametrize("kind", ["adamw", "projfactor"])
def test_memwrap_optimizer_state_for_experts_is_compressed(kind):
    model = tiny("qwen3_moe")
    memwrap.wrap(model, rank=4, granularity=2)
    opt = memwrap.optimizer(model, lr=1e-3, kind=kind)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    units = [u for m in model.modules() for u in getattr(m, experts.UNITS_ATTR, {}).values()]
    assert len(units) == 4
    for u in units:
        state = opt.state[u.coords]
        assert state["exp_avg"].shape == (u.num_experts, u.out_features, 2, 4)
        if kind == "adamw":  # subspace AdamW (the default): the second moment in the subspace too
            assert state["exp_avg_sq"].shape == (u.num_experts, u.out_features, 2, 4)
        else:
            assert state["v_row"].shape == (u.num_experts, u.out_features)
            assert state["v_col"].shape == (u.num_experts, u.in_features)
        assert torch.count_nonzero(u.coords) == 0
