"""Recipe (docs/retrofit.md): a nanoGPT-style loop — AdamW with weight-decay groups, a GradScaler, gradient
clipping and gradient accumulation — with one added line, `memwrap.wrap(model)`.

    python examples/retrofit_nanogpt.py [--steps N] [--compile]     (backend: $MEMWRAP_COMPILE_BACKEND, default inductor)

nanoGPT's `configure_optimizers` decays every parameter of 2 or more dimensions: memwrap's coords (n × c × r) land in
the decayed group, and memwrap applies that group's decoupled weight decay to the frozen weight W at each merge, as
AdamW would to W itself. Norm weights and biases stay undecayed. The GradScaler runs for real (fp16 autocast where
there is a GPU; on a CPU torch.amp.GradScaler("cpu") with bf16 autocast, where it scales and unscales just the same).
"""

import argparse
import os

import torch
from _retrofit_common import check, tiny_model, token_batches

import memwrap


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    model = tiny_model().to(device)
    memwrap.wrap(model, rank=4, granularity=2)  # the one added line
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # linears' coords, embeddings, an exact lm_head
    no_decay = [p for p in params if p.dim() < 2]  # norms, biases
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device)
    backend = os.environ.get("MEMWRAP_COMPILE_BACKEND", "inductor")
    forward = torch.compile(model, backend=backend) if args.compile else model
    batches = token_batches(args.steps * args.accumulation, batch=4)
    losses = []
    for step in range(args.steps):
        total = 0.0
        for micro in range(args.accumulation):
            ids = batches[step * args.accumulation + micro].to(device)
            with torch.autocast(device, dtype=amp_dtype):
                loss = forward(input_ids=ids, labels=ids).loss / args.accumulation
            scaler.scale(loss).backward()
            total += loss.item()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)  # memwrap merges the coords into W right after (a step the scaler skips merges nothing)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    check(losses, "nanoGPT-style loop" + (" (compiled)" if args.compile else ""))


if __name__ == "__main__":
    main()
