"""Recipe (docs/retrofit.md): torchrun DDP; `memwrap.wrap(model)` before `DistributedDataParallel(model)`.

    torchrun --nproc_per_node 2 examples/retrofit_ddp.py [--memwrap-optimizer] [OUT_DIR]
Every rank regenerates the same projections from (seed, layer name, step); DDP all-reduces only the compressed
gradients of the wrapped layers.
"""

import sys
import tempfile

import torch
import torch.distributed as dist
from _retrofit_common import check, tiny_model, token_batches
from torch.nn.parallel import DistributedDataParallel as DDP

import memwrap


def main():
    dist.init_process_group("gloo")  # "nccl" on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model()
    memwrap.wrap(model, rank=4, granularity=2)
    model = DDP(model)
    if "--memwrap-optimizer" in sys.argv:
        optimizer = memwrap.optimizer(model.module, lr=3e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for ids in token_batches(20):
        ids = ids.chunk(world)[rank]  # stands in for a DistributedSampler
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if rank == 0:
        check(losses, f"DDP on {world} ranks")
        args = [a for a in sys.argv[1:] if not a.startswith("--")]
        out = memwrap.save(model.module, args[0] if args else tempfile.mkdtemp(), optimizer=optimizer)  # rank 0 saves
        print(f"saved {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
