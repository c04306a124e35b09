"""accelerate: accelerator.prepare(model, optimizer, dataloader, scheduler) with a wrapped model and either optimizer
gives the plain loop's losses; accumulate/clip_grad_norm_ and save_state/load_state resume work."""

import pytest
import torch
from tiny import tiny_llama

import memwrap

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402

ACCUM, STEPS = 2, 6


def data():
    ids = torch.randint(0, 256, (STEPS * ACCUM * 4, 32), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4, shuffle=False)


def build(opt_kind):
    model = tiny_llama(seed=0)
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=3, seed=1)
    if opt_kind == "memwrap":
        opt = memwrap.optimizer(model, lr=3e-3, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (2 * STEPS))
    return model, opt, sched


def plain_loop(opt_kind):
    model, opt, sched = build(opt_kind)
    losses = []
    for i, (ids,) in enumerate(data()):
        loss = model(input_ids=ids, labels=ids).loss
        (loss / ACCUM).backward()
        losses.append(loss.item())
        if (i + 1) % ACCUM == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            opt.zero_grad()
    return losses


def accelerate_loop(opt_kind, *, stop_after=None, save_dir=None, resume_dir=None):
    """The user's accelerate loop; the only memwrap line is wrap (inside build) and sync after load_state."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model, opt, sched = build(opt_kind)
    model, opt, loader, sched = accelerator.prepare(model, opt, data(), sched)
    skip = 0
    if resume_dir is not None:
        accelerator.load_state(resume_dir)
        memwrap.sync(opt)  # a no-op for memwrap.optimizer, which syncs in its own load_state_dict
        skip = stop_after * ACCUM
        loader = accelerator.skip_first_batches(loader, skip)
    losses = []
    for i, (ids,) in enumerate(loader, start=skip):
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            opt.zero_grad()
        losses.append(loss.item())
        if stop_after is not None and resume_dir is None and i + 1 == stop_after * ACCUM:
            accelerator.save_state(save_dir)
            break
    return losses


@pytest.mark.parametrize("opt_kind", ["adamw", "memwrap"])
def test_accelerate_prepare_matches_plain_loop(opt_kind):
    plain = plain_loop(opt_kind)
    acc = accelerate_loop(opt_kind)
    assert len(acc) == len(plain) == STEPS * ACCUM
    assert max(abs(a - b) for a, b in zip(plain, acc)) < 1e-6
    assert acc[-1] < acc[0]


@pytest.mark.parametrize("opt_kind", ["adamw", "memwrap"])
def test_accelerate_save_state_load_state_resumes_bit_identically(tmp_path, opt_kind):
    """Checkpoint after 4 of 6 optimizer steps, P refreshed every 3: the resumed run must start on P index 1."""
    full = accelerate_loop(opt_kind)
    first = accelerate_loop(opt_kind, stop_after=4, save_dir=str(tmp_path))
    second = accelerate_loop(opt_kind, stop_after=4, resume_dir=str(tmp_path))
    assert first + second == full
