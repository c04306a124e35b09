"""TRL's SFTTrainer on a wrapped model: its fused LM head (fused_lm_head=True) computes the loss in chunks itself;
memwrap's layers train under it exactly as under their own loss, and a compressed lm_head, which TRL's head would
bypass, is refused with an error that says what to do."""

import pytest
import torch
from tiny import tiny_llama

import memwrap
from memwrap.compress import merge
from memwrap.errors import BypassedWeightError

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

VOCAB = 256


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 25, (n,), generator=g)  # ragged: padding and ignored positions
    return datasets.Dataset.from_dict(
        {"input_ids": [torch.randint(2, VOCAB, (int(k),), generator=g).tolist() for k in lengths]})


def trainer(model, tmp_path, steps=3, accumulation=2):
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                         max_steps=steps, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                         use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0)
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer())


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_trl_fused_head_gives_the_gradients_of_memwraps_own_loss(tmp_path):
    """One batch through SFTTrainer.compute_loss (TRL's fused head, num_items_in_batch) and through the wrapped
    model's own forward with labels (memwrap's chunked loss): same loss, same gradient for every trainable parameter."""
    model = tiny_llama(vocab=VOCAB)
    memwrap.wrap(model, rank=4, granularity=4, loss_chunk=16)
    tr = trainer(model, tmp_path)
    batch = next(iter(tr.get_train_dataloader()))
    labels = batch["labels"]
    n_items = int((labels[:, 1:] != -100).sum())
    loss_trl = tr.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n_items))
    loss_trl.backward()
    grads_trl = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels,
                num_items_in_batch=torch.tensor(n_items))
    assert out.logits is None  # memwrap's chunked loss served this call
    out.loss.backward()
    assert abs(loss_trl.item() - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    assert grads_trl.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.endswith("coords") for n in grads_trl) and "lm_head.weight" in grads_trl
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert rel(grads_trl[n], p.grad) <= 1e-5, n


def test_sft_trainer_trains_a_wrapped_model_and_logs_its_metrics(tmp_path):
    ref = tiny_llama(vocab=VOCAB)
    model = tiny_llama(vocab=VOCAB)
    memwrap.wrap(model, rank=4, granularity=4, loss_chunk=16)
    tr = trainer(model, tmp_path)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all("mean_token_accuracy" in h for h in logs)  # TRL's metrics come from its fused head, not logits
    units = merge.units_of(model)
    assert all(u.steps == 3 for u in units)  # every step merged into every wrapped weight
    q = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.weight, ref.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(model.lm_head.weight, ref.lm_head.weight)  # the exact head trained too
    memwrap.unwrap(model)  # TRL's forward still wraps memwrap's: after unwrap it is the model's own again
    ids = torch.randint(0, VOCAB, (2, 10))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (2, 10, VOCAB)


def test_a_compressed_lm_head_is_refused_under_trls_fused_head(tmp_path):
    model = tiny_llama(vocab=VOCAB)
    memwrap.wrap(model, rank=4, granularity=4, head="compress", loss_chunk=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = trainer(model, tmp_path)
    with pytest.raises(BypassedWeightError, match="head='exact'"):
        tr.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was stepped
