"""The budget-driven choice: plans fit their budget, less budget never means more bytes, errors say what fits."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, token_batch

import memwrap
from memwrap.config import _fmt_bytes
from memwrap.errors import BudgetTooSmallError, InvalidSettingsError
from memwrap.planning import planner


def peak(plan) -> int:
    return dict(plan.memory)["peak"]


def sweep(make_plan, budgets_gb):
    """(budget, plan or None) from the largest budget to the smallest."""
    out = []
    for gb in sorted(budgets_gb, reverse=True):
        try:
            out.append((gb, make_plan(gb)))
        except BudgetTooSmallError:
            out.append((gb, None))
    return out


def check_monotone(results):
    last = None
    seen_none = False
    for gb, plan in results:
        if plan is None:
            seen_none = True
            continue
        assert not seen_none, f"a smaller budget fit after a larger one failed ({gb} GB)"
        assert peak(plan) <= plan.budget_bytes == int(gb * 1e9)  # a plan fits its own budget
        if last is not None:
            assert peak(plan) <= last, f"{gb} GB gave more bytes than a larger budget"
        last = peak(plan)
    return [p for _, p in results if p is not None]


def test_tiny_model_smaller_budget_never_more_bytes():
    """The byte model's chooser (verify=False); the simulated plans are checked in test_simulate."""
    model = tiny_llama(hidden=128, layers=3, vocab=2048, intermediate=256)
    budgets = [0.004 * 1.3**k for k in range(22)]
    plans = check_monotone(sweep(lambda gb: planner.plan_for_model(
        model, memwrap.WrapConfig(), budget_gb=gb, batch_size=4, seq_len=256, verify=False), budgets))
    assert len({(p.layers[0].c * p.layers[0].r, p.gradient_checkpointing, p.chunked_cross_entropy) for p in plans}) >= 2
    assert not memwrap.compress.inject.is_wrapped(model)


def test_bundled_moe_smaller_budget_never_more_bytes():
    """The byte model's chooser (verify=False), as for the tiny model above."""
    budgets = [50 * 1.2**k for k in range(9)]
    plans = check_monotone(sweep(lambda gb: memwrap.plan("qwen3-30b-a3b", budget_gb=gb, batch_size=4, seq_len=2048,
                                                         compress_experts=True, verify=False), budgets))
    # several distinct settings along the way (levels and the extra measures)
    assert len({(p.layers[0].c * p.layers[0].r, p.gradient_checkpointing, p.chunked_cross_entropy) for p in plans}) >= 3


def test_budget_too_small_names_smallest_budget_and_largest_batch():
    """The byte model's bisection (verify=False): the smallest budget and largest batch it names are exact for it."""
    model = tiny_llama(hidden=128, layers=3, vocab=2048, intermediate=256)
    cfg = memwrap.WrapConfig()
    with pytest.raises(BudgetTooSmallError) as info:
        planner.plan_for_model(model, cfg, budget_gb=0.1, batch_size=64, seq_len=256, verify=False)
    err = info.value
    assert _fmt_bytes(err.min_budget_bytes) in str(err) and f"fits at batch {err.max_batch_size}" in str(err)
    # exactly the smallest budget: fits; a byte less: does not
    fits = planner.plan_for_model(model, cfg, budget_gb=(err.min_budget_bytes + 0.5) / 1e9, batch_size=64, seq_len=256,
                                  verify=False)
    assert peak(fits) <= err.min_budget_bytes
    with pytest.raises(BudgetTooSmallError):
        planner.plan_for_model(model, cfg, budget_gb=(err.min_budget_bytes - 2) / 1e9, batch_size=64, seq_len=256, verify=False)
    # the largest batch fits this budget, one more does not
    assert 1 <= err.max_batch_size < 64
    planner.plan_for_model(model, cfg, budget_gb=0.1, batch_size=err.max_batch_size, seq_len=256, verify=False)
    with pytest.raises(BudgetTooSmallError):
        planner.plan_for_model(model, cfg, budget_gb=0.1, batch_size=err.max_batch_size + 1, seq_len=256, verify=False)


def test_checkpointing_when_needed_is_applied_and_explained_not_asked_for():
    model = tiny_llama(hidden=128, layers=3, vocab=2048, intermediate=256)
    plans = [p for _, p in sweep(lambda gb: planner.plan_for_model(
        model, memwrap.WrapConfig(), budget_gb=gb, batch_size=8, seq_len=256), [0.004 * 1.2**k for k in range(25)]) if p]
    ckpt = [p for p in plans if p.checkpoint_layers]
    plain = [p for p in plans if not p.checkpoint_layers]
    assert ckpt and plain
    assert all(any("checkpointed" in n and n.startswith("wrap applies") for n in p.notes) for p in ckpt)
    assert not any(any("checkpointed" in n for n in p.notes) for p in plain)
    assert not any("gradient_checkpointing_enable" in n for p in plans for n in p.notes)


def test_siblings_get_equal_settings_and_share_one_saved_input():
    model = tiny_llama()
    plan = memwrap.wrap(model, budget_gb=1, batch_size=2, seq_len=32)
    by_group = {}
    for lp in plan.layers:
        by_group.setdefault(lp.group, set()).add((lp.c, lp.r))
    assert all(len(v) == 1 for v in by_group.values())
    groups = {id(m.group) for m in model.modules() if isinstance(m, memwrap.compress.CompressedLinear)}
    assert len(groups) == len(by_group)  # one InputGroup (one P, one x̃) per sibling group


def test_wrap_without_arguments_picks_settings_on_cpu():
    model = tiny_llama()
    plan = memwrap.wrap(model)
    assert plan.batch_size == planner.DEFAULT_BATCH_SIZE
    assert plan.seq_len == min(planner.DEFAULT_SEQ_LEN, model.config.max_position_embeddings)
    assert plan.budget_bytes > 0 and 0 < peak(plan) <= plan.budget_bytes
    assert plan.dtype == "fp32" and plan.memory and plan.notes
    loss = model(input_ids=token_batch(2, 16), labels=token_batch(2, 16)).loss
    loss.backward()  # trains
    assert all(m.coords.grad is not None for m in model.modules() if isinstance(m, memwrap.compress.CompressedLinear))


def test_explicit_rank_is_honoured_exactly():
    model = tiny_llama()
    plan = memwrap.wrap(model, rank=3, granularity=2, budget_gb=0.000001)  # explicit settings win over any budget
    assert {(lp.c, lp.r) for lp in plan.layers} == {(2, 3)}


def test_plan_from_config_directory_reapplies_exactly(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path / "cfg")
    plan = memwrap.plan(str(tmp_path / "cfg"), budget_gb=0.01, batch_size=4, seq_len=64, dtype="fp32", device="cpu")
    plan.save(tmp_path / "plan.json")
    applied = memwrap.wrap(model, plan=str(tmp_path / "plan.json"))
    assert applied == plan == memwrap.Plan.load(tmp_path / "plan.json")
    layers = {m.layer_name: (m.c, m.r) for m in model.modules() if isinstance(m, memwrap.compress.CompressedLinear)}
    assert layers == {lp.name: (lp.c, lp.r) for lp in plan.layers}
    # the plan from the config equals the plan from the instance
    fresh = tiny_llama()
    same = planner.plan_for_model(fresh, memwrap.WrapConfig(), budget_gb=0.01, batch_size=4, seq_len=64)
    assert [(lp.name, lp.c, lp.r) for lp in same.layers] == [(lp.name, lp.c, lp.r) for lp in plan.layers]
    assert dict(same.memory) == dict(plan.memory)


@pytest.mark.parametrize("kwargs", [dict(budget_gb=0), dict(budget_gb=-3), dict(budget_gb=float("nan")),
                                    dict(budget_gb="24"), dict(batch_size=0), dict(seq_len=-1),
                                    dict(batch_size=2.5), dict(budget_gb=1, zero=4), dict(budget_gb=1, zero=True),
                                    dict(budget_gb=1, world_size=8), dict(budget_gb=1, zero=2, world_size=0),
                                    dict(budget_gb=1, zero=2, offload_optimizer="yes"),
                                    dict(plan=memwrap.Plan(layers=()), zero=2)])
def test_bad_settings_raise_before_mutation(kwargs):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidSettingsError):
        memwrap.wrap(model, **kwargs)
    assert not memwrap.compress.inject.is_wrapped(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_rejects_unknown_model_and_dtype(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidSettingsError, match="bundled name"):
        memwrap.plan("no-such-org/no-such-model-xyz", budget_gb=10)
    with pytest.raises(InvalidSettingsError, match="dtype"):
        memwrap.plan("llama-2-7b", budget_gb=10, dtype="int3")


def test_settings_at_matches_the_level():
    for m in (64, 128, 2048, 1408, 5632, 11008):
        for level in planner.LEVELS:
            c, r = planner.settings_at(m, level)
            assert m % c == 0 and 1 <= r <= m // c
            assert c * r <= max(1, int(m * level)) and c * r >= 0.75 * m * level


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_moe_plan_from_config_equals_plan_from_instance(family, tmp_path):
    """Experts, shared experts and routers: the config-only plan is the one wrap makes, and it applies."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_experts_per_tok=2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cfg = (Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, **common)
           if family == "qwen2_moe" else MixtralConfig(num_local_experts=4, **common))
    cfg.save_pretrained(tmp_path)
    plan = memwrap.plan(str(tmp_path), budget_gb=0.05, batch_size=2, seq_len=32, dtype="fp32", device="cpu")
    model = AutoModelForCausalLM.from_config(cfg)
    same = planner.plan_for_model(model, memwrap.WrapConfig(), budget_gb=0.05, batch_size=2, seq_len=32)
    assert plan.expert_layers and [lp.to_dict() for lp in plan.layers] == [lp.to_dict() for lp in same.layers]
    assert dict(plan.memory) == dict(same.memory)
    assert memwrap.wrap(model, plan=plan) == plan


def test_deepspeed_zero_counts_one_ranks_bytes():
    """Under ZeRO the budget is one rank's: the planner's parts follow DeepSpeed's partitioning, so the same budget
    fits at least as coarse a compression as more ranks share the states, and ZeRO-3 shards the weights themselves."""
    kw = dict(budget_gb=40, batch_size=8, seq_len=2048)
    single = planner.plan("llama-2-7b", **kw)
    levels, by_stage = [], {}
    for world in (2, 8):
        for stage in (1, 2, 3):
            p = planner.plan("llama-2-7b", zero=stage, world_size=world, **kw)
            parts = dict(p.memory)
            assert parts["peak"] <= p.budget_bytes
            assert any(f"ZeRO-{stage} over {world} rank(s)" in n for n in p.notes)
            by_stage[stage, world] = parts
            levels.append(p.layers[0].c * p.layers[0].r / p.layers[0].in_features)
    # the same layers at 8 ranks: ZeRO-3 keeps 1/8 of the weights, stages 1-2 all of them (16-bit W and coords)
    weights = dict(single.memory)["weights"]
    assert by_stage[3, 8]["weights"] < by_stage[1, 8]["weights"] / 4
    assert by_stage[2, 8]["gradients"] < by_stage[1, 8]["gradients"]
    assert weights <= by_stage[1, 8]["weights"]  # coords are parameters DeepSpeed keeps in 16 bits
    offloaded = planner.plan("llama-2-7b", zero=2, world_size=8, offload_optimizer=True, **kw)
    assert dict(offloaded.memory)["optimizer states"] == 0
    assert any("CPU memory" in n for n in offloaded.notes)


def test_wrap_with_zero_plans_per_rank_and_applies():
    model = tiny_llama()
    plain = memwrap.wrap(tiny_llama(), budget_gb=0.01, batch_size=4, seq_len=64)
    plan = memwrap.wrap(model, budget_gb=0.01, batch_size=4, seq_len=64, zero=3, world_size=4)
    assert any("ZeRO-3 over 4 rank(s)" in n for n in plan.notes) and not any("ZeRO" in n for n in plain.notes)
    assert plan.optimizer == "adamw"  # DeepSpeed's AdamW steps the coords; ProjFactor is never counted there
    assert memwrap.compress.inject.is_wrapped(model)
