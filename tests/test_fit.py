"""wrap(budget_gb=...) fits by itself: the chunked loss is exact, the planner chooses quality first and then speed,
and the plan is applied whole (no note asks the user to act)."""

import pytest
import torch
from tiny import tiny_llama

import memwrap
from memwrap.compress import blocks
from memwrap.compress import loss as chunked
from memwrap.planning import estimate as est
from memwrap.planning import planner
from memwrap.planning.measure import LiveActivationMeter

ACT_WORDS = ("call ", "enable", "turn on", "write a", "you must", "needs gradient")


def big_vocab_llama(seed=0, tie=False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, use_cache=False)
    return AutoModelForCausalLM.from_config(cfg)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CASES = {
    "mean": {},
    "num_items_in_batch": {"num_items_in_batch": torch.tensor(37)},
    "shift_labels": {"shift_labels": True},
}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_loss_equals_the_model_loss_and_gradients(case, tie):
    ids = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :6] = -100  # ignored positions (prompt tokens)
    kwargs = dict(CASES[case])
    if kwargs.pop("shift_labels", False):
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
        kwargs = {"shift_labels": shifted}
    plain, model = big_vocab_llama(tie=tie), big_vocab_llama(tie=tie)
    assert chunked.install(model, chunk=7)  # 7 rows: chunks do not divide the 60 tokens
    ref = plain(input_ids=ids, labels=labels, **kwargs)
    out = model(input_ids=ids, labels=labels, **kwargs)
    ref.loss.backward()
    out.loss.backward()
    assert out.logits is None and ref.logits.shape == (3, 20, 1000)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    for (name, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        assert rel(b.grad, a.grad) <= 1e-5, name
    with torch.no_grad():  # without grad (evaluation) the logits come back as usual
        assert torch.equal(model(input_ids=ids, labels=labels).logits, plain(input_ids=ids, labels=labels).logits)
    assert model(input_ids=ids).logits.shape == (3, 20, 1000)  # and without labels
    assert chunked.remove(model) and "forward" not in model.__dict__


def test_chunked_loss_keeps_no_logits():
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for chunk in (0, 32):
        model = big_vocab_llama()
        memwrap.wrap(model, rank=4, granularity=2, loss_chunk=chunk)
        with LiveActivationMeter(model) as meter:
            loss = model(input_ids=ids, labels=ids).loss
        del loss
        sizes[chunk] = meter.bytes
    logits_fp32 = 4 * 64 * 1000 * 4
    assert sizes[0] - sizes[32] >= logits_fp32  # the fp32 log-probs (and the logits) are gone


def test_model_that_changes_its_logits_is_not_given_the_chunked_loss():
    """A head the check cannot reproduce (Gemma-2 soft-caps the logits after lm_head) keeps the model's own loss."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma2", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert not chunked.install(model, chunk=16)
    assert "forward" not in model.__dict__


def test_wrap_with_a_budget_fits_a_tiny_32k_vocab_model_by_itself():
    """wrap(budget_gb=0.45, batch 8 × 256) then an unchanged model(input_ids, labels) step: loss and the exact
    gradients (embedding, lm_head, norms) equal plain, and the forward keeps <= 0.30x plain's activation bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    def build():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=False, use_cache=False)
        return AutoModelForCausalLM.from_config(cfg)

    ids = torch.randint(0, 32000, (8, 256), generator=torch.Generator().manual_seed(0))
    plain = build()
    with LiveActivationMeter(plain) as meter:
        ref = plain(input_ids=ids, labels=ids).loss
    plain_bytes = meter.bytes
    ref.backward()
    model = build()
    plan = memwrap.wrap(model, budget_gb=0.45, batch_size=8, seq_len=256)  # plain AdamW's step needs more
    assert plan.loss_chunk and dict(plan.memory)["peak"] <= 0.45e9
    assert not any(w in n.lower() for n in plan.notes for w in ACT_WORDS)
    with LiveActivationMeter(model) as meter:
        loss = model(input_ids=ids, labels=ids).loss
    assert meter.bytes <= 0.30 * plain_bytes, meter.bytes / plain_bytes
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert rel(model.get_parameter(name).grad, plain.get_parameter(name).grad) <= 1e-4, name


def test_quality_first_never_finer_than_the_floor_while_checkpointing_everything_fits():
    """Across budgets: whenever every layer checkpointed at 1/8 would fit, the plan is at 1/8 or less compressed;
    among the choices at its compression it has the least predicted recompute; notes never ask the user to act."""
    model = tiny_llama(hidden=128, layers=4, vocab=2048, intermediate=256)
    sk_shape = est.ModelShape.from_config(model.config)
    weights = est.enumerate_weights(model)
    cands, _ = memwrap.compress.inject.find_targets(model, memwrap.WrapConfig(), memwrap.adapters.resolve(model))
    targets = [planner.Target(c.name, c.kind, c.in_features, c.out_features, c.num_experts, c.group_key) for c in cands]
    floor_layers = planner.layers_at(targets, planner.QUALITY_FLOOR, 4)
    cheapest = dict(norms="recompute", mlp="act", attention="keep", checkpoint_layers="all", loss_chunk=1024)
    floor_peak = est.estimate(sk_shape, weights, floor_layers, batch_size=8, seq_len=256, dtype_bytes=4,
                              savings=cheapest).peak_bytes
    seen = set()
    for gb in [0.005 * 1.25**k for k in range(20)]:
        try:
            plan = planner.plan_for_model(model, memwrap.WrapConfig(), budget_gb=gb, batch_size=8, seq_len=256)
        except memwrap.BudgetTooSmallError:
            continue
        level = plan.layers[0].c * plan.layers[0].r / plan.layers[0].in_features
        if floor_peak <= gb * 1e9:
            assert level >= planner.QUALITY_FLOOR * 0.99, (gb, level)
        assert not any(w in n.lower() for n in plan.notes for w in ACT_WORDS), plan.notes
        seen.add((round(level, 4), plan.savings["checkpoint_layers"] == "all", bool(plan.loss_chunk)))
    assert len(seen) >= 3  # the sweep walks through several compressions and measures


def test_llama_2_7b_at_24_gb_fits_by_itself_at_no_finer_than_1_32():
    plan = memwrap.plan("llama-2-7b", budget_gb=24, batch_size=8, seq_len=2048)
    parts = dict(plan.memory)  # the card: the simulated steady-state peak, the CUDA context, the allocator headroom
    assert parts["peak"] + parts["cuda context"] + parts["allocator headroom"] <= 24e9
    assert min(lp.c * lp.r / lp.in_features for lp in plan.layers) >= 1 / 32
    assert not any(w in n.lower() for n in plan.notes for w in ACT_WORDS)
    assert plan.optimizer in ("adamw", "projfactor") and plan.step_time_overhead is not None


def test_memwrap_optimizer_builds_the_one_the_plan_counted():
    model = tiny_llama()
    plan = memwrap.wrap(model, budget_gb=1, batch_size=2, seq_len=32)
    opt = memwrap.optimizer(model)
    assert {g["kind"] for g in opt.param_groups} == {plan.optimizer or "projfactor"}


def test_plan_applies_its_recompute_choices_exactly(tmp_path):
    model = tiny_llama(hidden=128, layers=4, vocab=2048, intermediate=256)
    plan = planner.plan_for_model(model, memwrap.WrapConfig(), budget_gb=0.06, batch_size=8, seq_len=256)
    plan.save(tmp_path / "plan.json")
    memwrap.wrap(model, plan=str(tmp_path / "plan.json"))
    parts = set(blocks.installed(model).values())
    if plan.checkpoint_layers:
        assert "layer" in parts
    if plan.mlp == "recompute":
        assert "mlp" in parts
    assert bool(plan.loss_chunk) == (chunked.LOSS_ATTR in model.__dict__)


@pytest.mark.parametrize("how", ["autocast", "argument"])
def test_activations_are_sized_in_the_dtype_the_run_computes_in(how):
    """fp32 weights trained under bf16 autocast: the plan sizes activations at 2 bytes, not 4."""
    sizes = {}
    for name in ("fp32", how):
        model = tiny_llama()
        if name == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                plan = memwrap.wrap(model, budget_gb=1, batch_size=4, seq_len=64)
        else:
            plan = memwrap.wrap(model, budget_gb=1, batch_size=4, seq_len=64,
                                activation_dtype=None if name == "fp32" else "bf16")
        sizes[name] = (plan.dtype, dict(plan.memory)["saved activations"])
    assert sizes["fp32"][0] == "fp32" and sizes[how][0] == "bf16"
    assert sizes[how][1] < 0.6 * sizes["fp32"][1]


def train_steps(model, ids, steps=2):
    opt = memwrap.optimizer(model, lr=1e-3)  # the optimizer the plan counted
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_first_step_matches_the_prediction_and_report_shows_each_part():
    import warnings

    from memwrap.planning.monitor import COMPARED

    model = tiny_llama(hidden=128, layers=2, vocab=512, intermediate=256)
    plan = memwrap.wrap(model, budget_gb=0.05, batch_size=4, seq_len=64)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as planned: no warning
        train_steps(model, ids)
    state = memwrap.get_plan(model) and memwrap.compress.inject.require_wrapped(model)
    measured, predicted = state.monitor.measured, dict(plan.memory)
    for part in COMPARED:
        assert abs(measured[part] - predicted[part]) <= 0.10 * predicted[part], (part, measured[part], predicted[part])
    table = memwrap.report(model)
    assert all(part in table for part in COMPARED) and "predicted GB" in table
    assert [type(h).__name__ for h in model._forward_pre_hooks.values()] == ["PreForwardCheck"]  # the monitor ran
    # once and removed its hooks; memwrap's own pre-forward check stays


def test_a_step_far_from_the_plan_warns_once():
    model = tiny_llama(hidden=128, layers=2, vocab=512, intermediate=256)
    memwrap.wrap(model, budget_gb=0.05, batch_size=1, seq_len=16)  # planned for 16 tokens, trained on 512
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="ran 512 tokens") as caught:
        train_steps(model, ids, steps=4)
    assert sum("the plan was made for 16" in str(w.message) for w in caught) == 1


def test_a_smaller_batch_than_planned_is_compared_at_its_own_tokens():
    import warnings

    model = tiny_llama(hidden=128, layers=2, vocab=512, intermediate=256)
    memwrap.wrap(model, budget_gb=0.05, batch_size=8, seq_len=64)  # planned 512 tokens, trained on 128
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, ids)
    assert memwrap.compress.inject.require_wrapped(model).monitor.tokens == 128


def test_the_monitor_does_not_bypass_the_users_saved_tensor_hooks():
    """The first training forward of a budget-planned model is measured by memwrap's monitor with saved-tensor hooks.
    Only the innermost hooks run, so a monitor that kept tensors to itself would silently switch off a user's
    `save_on_cpu` (or meter) for that step: the user's hooks must see, and pack, the same tensors on the first
    forward as on the second, and backward must give the same gradients."""
    from memwrap.planning.measure import SavedTensorMeter

    model = tiny_llama(hidden=128, layers=2, vocab=512, intermediate=256)
    memwrap.wrap(model, budget_gb=0.05, batch_size=4, seq_len=64)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    seen, grads = [], []
    for _ in range(2):  # the first forward is the monitored one
        packed = {"n": 0}

        def pack(t, packed=packed):
            packed["n"] += 1
            return ("user", t)

        def unpack(x):
            assert x[0] == "user"
            return x[1]
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            inner = SavedTensorMeter(model).__enter__()  # a second meter inside the user's hooks, like the monitor
            loss = model(input_ids=ids, labels=ids).loss
            inner.__exit__(None, None, None)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        model.zero_grad()
        seen.append((packed["n"], inner.bytes))
    state = memwrap.compress.inject.require_wrapped(model)
    assert state.monitor.measured["saved activations"] == seen[0][1] > 0  # the monitor measured, and both meters
    assert seen[0][1] == seen[1][1]  # (nested in each other on the first forward) counted the same bytes
    assert seen[0][0] == seen[1][0] > 0  # the user's pack ran on every saved tensor of the monitored forward too
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_replaced_forwards_keep_the_signature_callers_inspect():
    """The Trainer keeps dataset columns by the parameters of model.forward: the replacements show the original's."""
    import inspect

    model, plain = big_vocab_llama(), big_vocab_llama()
    memwrap.wrap(model, rank=4, granularity=2, loss_chunk=16, mlp="recompute")
    assert inspect.signature(model.forward) == inspect.signature(plain.forward)
    layer, plain_layer = model.model.layers[0].mlp, plain.model.layers[0].mlp
    assert inspect.signature(layer.forward) == inspect.signature(plain_layer.forward)


def test_the_first_step_with_optimizer_states_is_measured_phase_by_phase():
    """A budget plan carries its simulated steady-state phases; the monitor measures the second step's phases (live
    bytes on a CPU) and they agree within 10%, report() prints them, and every hook is gone afterwards."""
    import warnings

    model = tiny_llama(hidden=128, layers=2, vocab=512, intermediate=256)
    plan = memwrap.wrap(model, budget_gb=0.05, batch_size=4, seq_len=64)
    assert [k for k, _ in plan.phases] == ["forward", "backward", "optimizer"]
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, ids, steps=3)
    monitor = memwrap.compress.inject.require_wrapped(model).monitor
    predicted = monitor.predicted_phases()
    assert monitor.phases.keys() == predicted.keys()
    for phase, got in monitor.phases.items():
        assert abs(got - predicted[phase]) <= 0.10 * predicted[phase], (phase, monitor.phases, predicted)
    assert "after backward" in memwrap.report(model)
    assert not model._forward_hooks and not any(o._optimizer_step_pre_hooks for o in memwrap.compress.merge._LINKS)
