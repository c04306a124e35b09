"""Hugging Face Trainer, unchanged: trains (full rank = plain Trainer), accumulates, clips, resumes, exports."""

import warnings

import pytest
import torch
from tiny import tiny_llama

import memwrap
from memwrap.trainer import MemwrapCallback

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

# transformers >= 5.23 calls it activation_checkpointing (gradient_checkpointing still works there, with a warning)
CHECKPOINTING = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") \
    else "gradient_checkpointing"


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=32, vocab=256):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(out, *, batch=4, accum=2, steps=8, **kw):
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             max_steps=steps, learning_rate=3e-3, weight_decay=0.1, max_grad_norm=0.5, save_steps=4,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                             disable_tqdm=True, **kw)


COMPRESSED = (("rank", 4), ("granularity", 2), ("refresh_every", 3), ("seed", 1))


def train(out, *, wrap=COMPRESSED, optimizer=None, resume=None,
          callbacks=None, model_kw=None, **kw):
    """Train a tiny Llama under Trainer; returns (model, trainer, per-step losses from Trainer's own log).

    wrap: memwrap.wrap keyword arguments, None for no memwrap, or a path: wrap(model, plan=path)."""
    model = tiny_llama(seed=0, **(model_kw or {}))
    if isinstance(wrap, str):
        memwrap.wrap(model, plan=wrap)
    elif wrap is not None:
        memwrap.wrap(model, **dict(wrap))
    opt = (optimizer(model), None) if optimizer else (None, None)
    trainer = Trainer(model=model, args=args(out, **kw), train_dataset=TokenDataset(), optimizers=opt,
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    first = 0 if resume is None else int(resume.rstrip("/").rsplit("-", 1)[1])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > first]
    return model, trainer, losses


def test_full_rank_wrapped_trainer_equals_plain_trainer(tmp_path):
    """c = 1, r = m: P = I, so Trainer's AdamW on coords + merge must equal Trainer's AdamW on W, step for step."""
    kw = dict(model_kw=dict(intermediate=64))
    _, _, plain = train(tmp_path / "plain", wrap=None, **kw)
    model, _, wrapped = train(tmp_path / "wrapped", wrap=dict(rank=64, granularity=1), **kw)
    assert len(plain) == len(wrapped) == 8
    assert max(abs(a - b) for a, b in zip(plain, wrapped)) < 1e-4
    assert wrapped[-1] < wrapped[0] - 0.1
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("proj.weight"))


def test_default_wrap_then_unchanged_trainer_trains(tmp_path):
    """The issue's "nothing else changed": memwrap.wrap(model) with no settings, then the user's Trainer code."""
    model, _, losses = train(tmp_path, wrap={}, steps=8)
    assert any(isinstance(m, memwrap.compress.CompressedLinear) for m in model.modules())
    assert losses[-1] < losses[0] - 0.1


def test_gradient_accumulation_equals_one_big_batch_under_trainer(tmp_path):
    _, _, big = train(tmp_path / "big", batch=8, accum=1, steps=4)
    _, _, accum = train(tmp_path / "accum", batch=4, accum=2, steps=4)
    assert max(abs(a - b) for a, b in zip(big, accum)) < 1e-4


def test_gradient_checkpointing_under_trainer_equals_plain_backward(tmp_path):
    """Trainer's activation checkpointing recomputes the forward (and x̃, under the same P) in backward: same losses."""
    _, _, plain = train(tmp_path / "plain", steps=4)
    _, _, ckpt = train(tmp_path / "ckpt", steps=4, **{CHECKPOINTING: True})
    assert ckpt == plain


@pytest.mark.parametrize("which", ["trainer-adamw", "memwrap-optimizer"])
def test_resume_from_checkpoint_reproduces_uninterrupted_losses(tmp_path, which):
    """8 steps, checkpoint at 4, P refreshed every 3 steps (the checkpoint sits between refreshes)."""
    kw = dict(optimizer=lambda m: memwrap.optimizer(m, lr=3e-3, weight_decay=0.1)) if which == "memwrap-optimizer" else {}
    cb = [MemwrapCallback()] if which == "trainer-adamw" else None
    model, _, full = train(tmp_path, callbacks=cb, **kw)
    if cb:  # MemwrapCallback also wrote the plan into the checkpoint: re-wrap exactly from it
        plan = str(tmp_path / "checkpoint-4" / "memwrap_plan.json")
        assert memwrap.Plan.load(plan) == memwrap.get_plan(model)
        kw["wrap"] = plan
    _, _, resumed = train(tmp_path, callbacks=cb, resume=str(tmp_path / "checkpoint-4"), **kw)
    diff = max(abs(a - b) for a, b in zip(full[4:], resumed))
    print(f"{which}: resumed losses {resumed}, max |difference| to the uninterrupted run {diff:.3g}")
    assert len(resumed) == 4
    assert diff == 0.0  # bit-identical on CPU
    assert full[-1] < full[0]


def test_resume_without_callback_warns_and_stays_close(tmp_path):
    """Trainer's AdamW without MemwrapCallback: the first resumed gradient uses the stale P; memwrap warns."""
    _, _, full = train(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, resumed = train(tmp_path, resume=str(tmp_path / "checkpoint-4"))
    assert any("memwrap.sync(optimizer)" in str(w.message) for w in caught)
    assert resumed != full[4:]  # what MemwrapCallback fixes
    rel = max(abs(a - b) / b for a, b in zip(full[4:], resumed))
    print(f"resume without MemwrapCallback: max relative loss difference {rel:.3g}")
    assert rel < 0.01


def test_save_model_loads_into_plain_transformers_with_equal_logits(tmp_path):
    model, trainer, _ = train(tmp_path / "run", steps=4)
    trainer.save_model(str(tmp_path / "export"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert not any(isinstance(m, memwrap.compress.CompressedLinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(model.state_dict())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, plain(input_ids=ids).logits
    diff = (a - b).abs().max().item()
    print(f"save_model -> from_pretrained: max |logit difference| {diff:.3g}")
    assert diff == 0.0
    untrained = tiny_llama(seed=0)
    with torch.no_grad():
        assert (untrained(input_ids=ids).logits - b).abs().max() > 1e-3  # the export holds the trained weights


def test_chunked_loss_under_trainer_gives_the_same_losses_and_weights(tmp_path):
    """Trainer's compute_loss passes num_items_in_batch (gradient accumulation) into the model's loss: with the
    chunked loss the logged losses and the trained weights equal the same wrap with the model's own loss."""
    ref_model, _, ref = train(tmp_path / "own", wrap=COMPRESSED)
    model, _, chunked = train(tmp_path / "chunked", wrap=COMPRESSED + (("loss_chunk", 24),))
    assert chunked == pytest.approx(ref, rel=1e-5)
    # AdamW turns gradient rounding (1e-7) into larger differences where gradients are near zero (rare tokens'
    # embedding rows): the trained update of every tensor agrees to 1% of its largest entry
    start = tiny_llama(seed=0).state_dict()
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        update = (a - start[name]).abs().max().item()
        assert (b - a).abs().max().item() <= 0.01 * update + 1e-7, name
