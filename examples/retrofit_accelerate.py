"""Recipe (docs/retrofit.md): an accelerate loop; `memwrap.wrap(model)` before `accelerator.prepare`.

    python examples/retrofit_accelerate.py [--memwrap-optimizer] [STATE_DIR]
    torchrun --nproc_per_node 2 examples/retrofit_accelerate.py ...   (or accelerate launch: DDP over 2 processes)
"""

import os
import sys
import tempfile

import torch
from _retrofit_common import check, tiny_model, token_batches
from accelerate import Accelerator

import memwrap


def main():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_model()
    memwrap.wrap(model, rank=4, granularity=2)
    if "--memwrap-optimizer" in sys.argv:
        optimizer = memwrap.optimizer(model, lr=3e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(torch.cat(token_batches(4)), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for _ in range(4):
        for ids in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=ids, labels=ids).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.item())
    if accelerator.is_main_process:
        check(losses, "accelerate")
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    checkpoint_dir = args[0] if args else os.path.join(tempfile.gettempdir(), "retrofit_accelerate_state")
    accelerator.save_state(checkpoint_dir)
    accelerator.wait_for_everyone()
    accelerator.load_state(checkpoint_dir)  # what a resumed run does, after prepare()
    memwrap.sync(optimizer)


if __name__ == "__main__":
    main()
