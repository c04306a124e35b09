"""Recipe (docs/retrofit.md): memwrap in a plain PyTorch loop, with checkpoint and resume.

    python examples/retrofit_plain.py [--memwrap-optimizer] [OUT_DIR]
"""

import sys
import tempfile

import torch
from _retrofit_common import check, tiny_model, token_batches

import memwrap


def main():
    use_memwrap_opt = "--memwrap-optimizer" in sys.argv
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = args[0] if args else tempfile.mkdtemp()
    model = tiny_model()
    memwrap.wrap(model, rank=4, granularity=2)
    if use_memwrap_opt:
        optimizer = memwrap.optimizer(model, lr=3e-3, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = []
    for ids in token_batches(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    memwrap.save(model, out, optimizer=optimizer)  # model.safetensors + memwrap_plan.json + optimizer.pt, atomically
    check(losses, "plain loop")

    # resume: a fresh model, the saved weights and plan, a new optimizer, its saved state
    model = tiny_model(seed=1)
    memwrap.load(model, out)  # loads the weights, then wrap(model, plan=<saved plan>)
    if use_memwrap_opt:
        optimizer = memwrap.optimizer(model, lr=3e-3, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    memwrap.load_optimizer(optimizer, out)  # torch.load(weights_only=True) + memwrap.sync
    ids = token_batches(1)[0]
    with torch.no_grad():
        print(f"resumed from {out}: loss {model(input_ids=ids, labels=ids).loss.item():.4f}")


if __name__ == "__main__":
    main()
