"""Worker for test_resume: train, checkpoint, or resume in a fresh process; writes losses as JSON.

usage: resume_worker.py MODE OPT CKPT_DIR OUT_JSON   (MODE: full | first | second; OPT: memwrap | adamw | adamw-nosync)
"""

import json
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from tiny import tiny_llama  # noqa: E402

import memwrap  # noqa: E402

TOTAL, SPLIT = 12, 6


def batch(step):
    g = torch.Generator().manual_seed(1000 + step % 3)  # three batches, cycled: learnable
    return torch.randint(0, 256, (4, 32), generator=g)


def build(opt_kind):
    model = tiny_llama(seed=0)
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=4, seed=3)
    if opt_kind == "memwrap":
        opt = memwrap.optimizer(model, lr=3e-3, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return model, opt


def train(model, opt, steps, batch_of=batch):
    """The training loop every resume test compares: clipped steps, one loss per step."""
    losses = []
    for step in steps:
        ids = batch_of(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main():
    mode, opt_kind, ckpt, out = sys.argv[1:5]
    torch.set_num_threads(1)
    model, opt = build(opt_kind)
    if mode == "full":
        losses = train(model, opt, range(TOTAL))
    elif mode == "first":
        losses = train(model, opt, range(SPLIT))
        torch.save(model.state_dict(), f"{ckpt}/model.pt")
        torch.save(opt.state_dict(), f"{ckpt}/optim.pt")
    else:
        model.load_state_dict(torch.load(f"{ckpt}/model.pt", weights_only=True))
        opt.load_state_dict(torch.load(f"{ckpt}/optim.pt", weights_only=True))
        if opt_kind == "adamw":
            memwrap.sync(opt)
        losses = train(model, opt, range(SPLIT, TOTAL))
    with open(out, "w") as f:
        json.dump(losses, f)


if __name__ == "__main__":
    main()
