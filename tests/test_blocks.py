"""Whole-layer activation savings: exact losses and gradients, measured bytes against targets and the byte model,
unwrap restores the modules, options validated."""

import copy

import pytest
import torch
from families import tiny
from test_adapters import tiny_bert
from test_estimate import tiny as estimate_tiny

import memwrap
from memwrap.compress import blocks
from memwrap.planning import estimate as est
from memwrap.planning.measure import LiveActivationMeter

OPTIONS = {
    "default": {},
    "recompute": {"mlp": "recompute", "attention": "recompute"},
    "layers": {"checkpoint_layers": "all"},
}
FAMILIES = ["llama", "gpt2", "qwen3", "gemma", "phi3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", "bert"]


def build(family):
    return tiny_bert() if family == "bert" else tiny(family)


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_savings_are_exact(family, option):
    """Loss equals plain to 1e-5; every gradient that is not a compressed weight's equals plain to 1e-4; coords
    gradients equal those of the same wrap without savings (so the estimator stays unbiased, as tested in
    test_layers)."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    plain_loss, plain_grads = loss_and_grads(build(family), ids)
    bare = build(family)
    memwrap.wrap(bare, rank=4, granularity=2, norms="keep", mlp="keep")
    _, bare_grads = loss_and_grads(bare, ids)
    model = build(family)
    memwrap.wrap(model, rank=4, granularity=2, **OPTIONS[option])
    assert blocks.installed(model) or family == "bert" and option == "default"
    loss, grads = loss_and_grads(model, ids)
    assert abs(loss - plain_loss) <= 1e-5 * abs(plain_loss)
    exact = [n for n in grads if "coords" not in n]
    assert exact and all(rel(grads[n], plain_grads[n]) <= 1e-4 for n in exact), \
        max((rel(grads[n], plain_grads[n]), n) for n in exact)
    coords = [n for n in grads if "coords" in n]
    assert coords and all(rel(grads[n], bare_grads[n]) <= 1e-6 for n in coords)


def live_bytes(model, ids):
    with LiveActivationMeter(model) as meter:
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return meter.bytes


def llama_bf16():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, tie_word_embeddings=False, use_cache=False)
    return AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).train()


def qwen3_moe_bf16():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=256, intermediate_size=688, moe_intermediate_size=128,
                         num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=64, tie_word_embeddings=False, use_cache=False)
    return AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).train()


@pytest.mark.parametrize("build_model,default_target", [(llama_bf16, 0.55), (qwen3_moe_bf16, 0.60)])
def test_measured_bytes_meet_the_targets(build_model, default_target):
    """bf16, measured with a dispatch-mode meter: default wrap <= 0.55x (Llama) / 0.60x (Qwen3-MoE) of plain,
    attention + MLP recompute <= 0.30x, every layer checkpointed within 5% of HF's gradient checkpointing."""
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    plain = live_bytes(build_model(), ids)
    got = {}
    for name, options in OPTIONS.items():
        model = build_model()
        memwrap.wrap(model, rank=8, granularity=4, **options)
        got[name] = live_bytes(model, ids)
    hf = build_model()
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    memwrap.wrap(hf, rank=8, granularity=4)
    hf_bytes = live_bytes(hf, ids)
    print({k: round(v / plain, 3) for k, v in got.items()}, "HF ckpt", round(hf_bytes / plain, 3))
    assert got["default"] <= default_target * plain
    assert got["recompute"] <= 0.30 * plain
    assert abs(got["layers"] - hf_bytes) <= 0.05 * hf_bytes


SAVINGS = {"keep": {"norms": "keep", "mlp": "keep"}, "default": {}, "mlp": {"mlp": "recompute"},
           "attention": {"attention": "recompute"}, "both": {"mlp": "recompute", "attention": "recompute"},
           "layers": {"checkpoint_layers": "all"}, "layer 1": {"checkpoint_layers": [1]},
           "head": {"head": "compress"}, "head, chunked loss": {"head": "compress", "loss_chunk": 16}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llama", "qwen3_moe", "bert", "mixtral", "gpt2"])
def test_byte_model_predicts_every_option_within_one_percent(kind, dtype):
    errors = {}
    for name, options in SAVINGS.items():
        model = (tiny("mixtral") if kind == "mixtral" else estimate_tiny(kind)).to(dtype).train()
        shape, weights = est.ModelShape.from_config(model.config), est.enumerate_weights(model)
        plan = memwrap.wrap(model, rank=4, granularity=4, **options)
        B, T = 2, 48
        ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))
        measured = live_bytes(model, ids)
        acts = est.saved_activations(shape, weights, plan.layers, B, T, dtype.itemsize, savings=plan.savings)
        predicted = sum(v for k, v in acts.items() if not k.startswith("_"))
        errors[name] = predicted / measured - 1
    assert all(abs(e) <= 0.01 for e in errors.values()), errors


def test_unwrap_restores_the_exact_modules_and_nothing_is_patched_globally():
    model = tiny("qwen3_moe")
    ref = copy.deepcopy(model)
    forwards = {type(m): type(m).forward for m in model.modules()}
    memwrap.wrap(model, rank=4, granularity=2, mlp="recompute", attention="recompute", checkpoint_layers=[1])
    assert set(blocks.installed(model).values()) == {"norm", "mlp", "attention", "layer"}
    other = tiny("qwen3_moe")  # another instance of the same classes runs their own forward
    assert not any("forward" in m.__dict__ for m in other.modules())
    memwrap.unwrap(model)
    assert not any("forward" in m.__dict__ or blocks.SAVINGS_ATTR in m.__dict__ for m in model.modules())
    assert {type(m): type(m).forward for m in model.modules()} == forwards
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True))


def test_options_are_validated_before_anything_changes():
    model = tiny("llama")
    before = [type(m) for m in model.modules()]
    for bad in ({"mlp": "fast"}, {"attention": "int4"}, {"norms": "skip"}, {"checkpoint_layers": [-1]},
                {"checkpoint_layers": "some"}, {"loss_chunk": -8}, {"loss_chunk": True}, {"loss_chunk": 2.5},
                {"activation_dtype": "int3"}, {"checkpoint_layers": [2]}):
        with pytest.raises(memwrap.InvalidSettingsError, match="use one of|layer indices|tokens per chunk|not layers"):
            memwrap.wrap(model, rank=4, granularity=2, **bad)
        assert [type(m) for m in model.modules()] == before and not blocks.installed(model)


def test_plan_round_trips_the_options_and_reapplies_them(tmp_path):
    model = tiny("llama")
    plan = memwrap.wrap(model, rank=4, granularity=2, mlp="recompute", checkpoint_layers=[0])
    plan.save(tmp_path / "plan.json")
    loaded = memwrap.Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    again = tiny("llama")
    memwrap.wrap(again, plan=loaded)
    assert blocks.installed(again) == blocks.installed(model)


def test_a_trained_model_with_savings_saves_and_loads_like_the_plain_one(tmp_path):
    """Savings change nothing that is saved: the state dict has the plain model's keys and values."""
    model = tiny("llama")
    memwrap.wrap(model, rank=4, granularity=2, mlp="recompute", attention="recompute")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    plain = tiny("llama")
    assert set(model.state_dict()) == set(plain.state_dict())
    memwrap.save(model, tmp_path / "ckpt", optimizer=opt)
    fresh = tiny("llama", seed=3)
    memwrap.load(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("option", ["default", "recompute", "layers"])
def test_savings_are_exact_under_autocast(option):
    """bf16 autocast on the CPU: the recomputed regions run under the same autocast state as the first forward."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    runs = []
    for options in ({"norms": "keep", "mlp": "keep"}, OPTIONS[option]):
        model = tiny("llama")
        memwrap.wrap(model, rank=4, granularity=2, **options)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_loss, ref), (loss, grads) = runs
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert all(rel(grads[n], ref[n]) <= 1e-4 for n in ref)
