"""Whole-layer activation savings: exact losses and gradients, measured bytes against targets and the byte model,
unwrap restores the modules, options validated."""

import copy

import pytest
import torch
from families import tiny
from test_adapters import tiny_bert
from test_estimate import tiny as estimate_tiny

import memwrap
from memwrap.compress import blocks, inject
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
           "head": {"head": "compress"}, "head, chunked loss": {"head": "compress", "loss_chunk": 16},
           "int8": {"attention": "int8"}, "fp8, mlp": {"attention": "fp8", "mlp": "recompute"},
           "int8, layer 0": {"attention": "int8", "checkpoint_layers": [0]}}


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
    assert all(abs(e) <= 0.01 for e in errors.values()), sorted(errors.items(), key=lambda kv: -abs(kv[1]))[:3]


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


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "qwen3_moe", "bert"])
def test_8bit_attention_keeps_the_loss_and_bounds_the_gradient_error(family):
    """attention="int8"/"fp8": the forward is SDPA's own (loss equal to plain to 1e-6), the gradients see 8-bit
    q, k, v. Their relative error (all gradients together) is bounded by the formats' precision: int8 (absmax/127
    per row, error ≤ 1/254 of a row's largest entry) within 2%, fp8 e4m3 (3 mantissa bits, 1/16 relative) within
    10%, and int8 is the more precise of the two on every model."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the same dropout masks in every run (BERT's hidden dropout)
    plain_loss, ref = loss_and_grads(_wrapped(family, {}), ids)
    errors = {}
    for fmt, bound in (("int8", 0.02), ("fp8", 0.10)):
        model = _wrapped(family, {"attention": fmt})
        assert set(blocks.installed(model).values()) >= {"attention"}
        torch.manual_seed(1)
        loss, grads = loss_and_grads(model, ids)
        assert abs(loss - plain_loss) <= 1e-6 * abs(plain_loss)
        errors[fmt] = rel(flat(grads, ref), flat(ref, ref))  # over all gradients (a key bias's is ~0 exactly)
        assert 0 < errors[fmt] <= bound, (fmt, errors[fmt])
    assert errors["int8"] < errors["fp8"]


def flat(grads, names):
    return torch.cat([grads[n].flatten() for n in names])


def _wrapped(family, options):
    model = build(family)
    memwrap.wrap(model, rank=4, granularity=2, **options)
    return model


def test_8bit_attention_replays_the_dropout_mask():
    """Attention dropout in training: backward reruns SDPA with the forward's RNG state, so int8 gradients stay
    as close to the exact ones as without dropout (a different mask would give O(1) errors)."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    runs = {}
    for fmt, p in (("keep", 0.0), ("keep", 0.3), ("int8", 0.3)):
        model = tiny_bert()
        for m in model.modules():  # BertSelfAttention passes dropout=self.dropout.p to SDPA in training
            if hasattr(m, "attention_head_size") and isinstance(getattr(m, "dropout", None), torch.nn.Dropout):
                m.dropout.p = p
        memwrap.wrap(model, rank=4, granularity=2, attention=fmt)
        torch.manual_seed(5)
        runs[fmt, p] = loss_and_grads(model, ids)
    (loss0, ref), (loss1, grads) = runs["keep", 0.3], runs["int8", 0.3]
    no_dropout = runs["keep", 0.0][1]
    assert loss1 == loss0
    error, dropout_effect = rel(flat(grads, ref), flat(ref, ref)), rel(flat(no_dropout, ref), flat(ref, ref))
    assert error <= 0.02 and dropout_effect >= 10 * error, (error, dropout_effect)  # the mask matters; it is replayed


def test_8bit_attention_needs_sdpa_and_leaves_the_model_untouched():
    model = tiny("llama")
    model.config._attn_implementation = "eager"
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(memwrap.errors.InvalidSettingsError, match="attn_implementation='sdpa'"):
        memwrap.wrap(model, rank=4, granularity=2, attention="int8")
    assert {n: type(m) for n, m in model.named_modules()} == before and not inject.is_wrapped(model)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_norm_and_gated_act_functions_are_bit_exact_in_bf16(family):
    """The hand-written backward runs autograd's ops in autograd's order: in bf16 (where the norm upcasts through a
    copy, as plain training does) the outputs and the gradients of the input and the weight equal plain training's
    bit for bit; act(gate)·up too, in bf16 and fp32."""
    from memwrap.compress.elementwise import GatedActFn, RMSNormFn, act_kind, norm_eps, norm_mode

    model = tiny(family).to(torch.bfloat16)
    norm, mlp = model.model.layers[0].input_layernorm, model.model.layers[0].mlp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, norm.weight.shape[0], generator=g).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    runs = []
    for fn in (lambda t: type(norm).forward(norm, t), lambda t: RMSNormFn.apply(t, norm.weight, norm_eps(norm),
                                                                                 norm_mode(norm))):
        y = fn(x)
        (y.float() * dy.float()).sum().backward()
        runs.append((y.detach(), x.grad, norm.weight.grad))
        x.grad = norm.weight.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    for dtype in (torch.bfloat16, torch.float32):
        act = mlp.act_fn
        gate, up = (torch.randn(7, 16, generator=g).to(dtype).requires_grad_() for _ in range(2))
        dh = torch.randn(7, 16, generator=g).to(dtype)
        runs = []
        kind = act_kind(act, gate)
        for fused in (False, True):
            h = GatedActFn.apply(gate, up, act, kind) if fused else act(gate) * up
            (h * dh).sum().backward()
            runs.append((gate.grad, up.grad))
            gate.grad = up.grad = None
        assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
