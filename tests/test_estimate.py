"""The byte model against measurement: saved activations (hooks), gradient/optimizer bytes, peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import memwrap
from memwrap.planning import estimate as est
from memwrap.planning.measure import SavedTensorMeter, optimizer_state_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(kind: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, LlamaConfig, Qwen3MoeConfig

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg)
    elif kind == "qwen3_moe":
        cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg)
    elif kind == "gpt2":  # GPT-2 keeps its residual and embedding dropout; attention dropout off (as for BERT)
        from transformers import GPT2Config

        cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, attn_pdrop=0.0,
                         bos_token_id=0, eos_token_id=0)
        model = AutoModelForCausalLM.from_config(cfg)
    else:  # BERT keeps its hidden dropout; attention dropout off (sdpa would take the math path)
        cfg = BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, attention_probs_dropout_prob=0.0)
        model = AutoModelForMaskedLM.from_config(cfg)
    return model.to(dtype).train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "memwrap"])
@pytest.mark.parametrize("kind", ["llama", "qwen3_moe", "bert", "gpt2"])
def test_saved_activation_bytes_match_hooks(kind, wrapped, dtype):
    model = tiny(kind, dtype)
    shape = est.ModelShape.from_config(model.config)
    weights = est.enumerate_weights(model)
    plan = memwrap.wrap(model, rank=4, granularity=4, norms="keep", mlp="keep") if wrapped else None
    layers = plan.layers if wrapped else None
    B, T = 2, 48
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    with SavedTensorMeter(model) as meter:
        model(input_ids=ids, labels=ids).loss.backward()
    predicted = sum(est.saved_activations(shape, weights, layers, B, T, dtype.itemsize,
                                          savings=plan.savings if wrapped else None).values())
    assert abs(predicted - meter.bytes) <= 0.05 * meter.bytes, (predicted, meter.bytes)


def test_saved_activation_bytes_scale_with_tokens_and_compression():
    """The prediction tracks a measurement at other shapes too (B, T, and c·r), not only the calibrated one."""
    model = tiny("llama")
    shape, weights = est.ModelShape.from_config(model.config), est.enumerate_weights(model)
    plan = memwrap.wrap(model, rank=2, granularity=8)
    for B, T in ((1, 17), (3, 64)):
        ids = torch.randint(0, 256, (B, T))
        with SavedTensorMeter(model) as meter:
            model(input_ids=ids, labels=ids)
        predicted = sum(est.saved_activations(shape, weights, plan.layers, B, T, 4, savings=plan.savings).values())
        assert abs(predicted - meter.bytes) <= 0.05 * meter.bytes, (B, T, predicted, meter.bytes)


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("optimizer", ["adamw", "projfactor", "torch-adamw-on-wrapped"])
def test_gradient_and_optimizer_bytes_exact(kind, optimizer):
    model = tiny(kind)
    weights = est.enumerate_weights(model)
    if optimizer == "adamw":
        layers, opt = None, torch.optim.AdamW(model.parameters(), lr=1e-3)
        predicted_kind = "adamw"
    else:
        layers = memwrap.wrap(model, rank=4, granularity=4).layers
        if optimizer == "projfactor":
            opt, predicted_kind = memwrap.optimizer(model, lr=1e-3, kind="projfactor"), "projfactor"
        else:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            predicted_kind = "adamw"
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    pred_grads, pred_states = est.trainable_bytes(weights, layers, 4, predicted_kind)
    assert pred_grads == grads
    assert pred_states == optimizer_state_bytes(opt)


@pytest.mark.parametrize("mode", ["plain", "memwrap"])
def test_predicted_peak_matches_rss_of_a_training_step(mode):
    """A fresh process: peak RSS growth over one forward/backward/AdamW step vs the predicted peak."""
    out = subprocess.run([sys.executable, "-m", "memwrap.planning.rss_probe", mode, "8", "256"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                              "MALLOC_MMAP_THRESHOLD_": "65536"})  # RSS follows live tensors (no heap reuse)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(got)
    assert abs(got["predicted"] - got["measured"]) <= 0.15 * got["measured"], got


def test_bundled_configs_build_on_meta_with_known_sizes():
    """The bundled configs give the published parameter counts (within 1%), with nothing allocated."""
    published = {"llama-2-7b": 6.74e9, "qwen1.5-moe-a2.7b": 14.3e9, "mixtral-8x7b": 46.7e9, "qwen3-30b-a3b": 30.5e9}
    for name, count in published.items():
        model = est.meta_model(est.load_config(name))
        total = sum(w.numel for w in est.enumerate_weights(model))
        assert abs(total - count) <= 0.01 * count, (name, total)
        assert all(p.device.type == "meta" for p in model.parameters())


def test_a_missing_path_never_goes_to_the_hub(tmp_path, monkeypatch):
    """A path that does not exist is an error at once: only the local lookup runs, whatever HF_HUB_OFFLINE says."""
    from transformers import AutoConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    real = AutoConfig.from_pretrained

    def spy(name, **kw):
        calls.append(kw.get("local_files_only"))
        return real(name, **kw)

    monkeypatch.setattr(AutoConfig, "from_pretrained", spy)
    for missing in (str(tmp_path / "no" / "model"), "./no/such/model"):
        with pytest.raises(memwrap.InvalidSettingsError, match="cannot read a config"):
            est.load_config(missing)
    assert calls == [True, True]
