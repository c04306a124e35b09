"""torchrun worker for test_update_path: DDP + ZeroRedundancyOptimizer (2 ranks, gloo, CPU).

usage: torchrun --nproc_per_node 2 dist_zero.py OUT_JSON STEPS
Writes, from rank 0: per-step global-batch losses and a checksum of the final weights on every rank, for the plain
model, a full-rank wrap (must equal plain) and a compressed wrap (P refreshed every 2 steps), each under DDP with a
ZeroRedundancyOptimizer over AdamW (weight decay 0.1).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
from dist_exit import finish  # noqa: E402
from test_moe import full_rank  # noqa: E402
from tiny import tiny_llama  # noqa: E402

import memwrap  # noqa: E402

GLOBAL_BATCH, SEQ = 8, 32


def global_batch(step):
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(700 + step % 3))


def build(kind):
    model = tiny_llama(seed=0)
    if kind == "full-rank":
        memwrap.wrap(model, plan=full_rank(memwrap.wrap(tiny_llama(seed=0), rank=4, granularity=2)))
    elif kind == "compressed":
        memwrap.wrap(model, rank=4, granularity=2, refresh_every=2, seed=1)
    return model


def run(kind, steps, rank, world):
    model = build(kind)
    ddp = DDP(model)
    opt = ZeroRedundancyOptimizer([p for p in ddp.parameters() if p.requires_grad], optimizer_class=torch.optim.AdamW,
                                  lr=3e-3, weight_decay=0.1)
    losses = []
    for step in range(steps):
        ids = global_batch(step).chunk(world)[rank]
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        dist.all_reduce(loss := loss.detach(), op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    weights = {k: v.double().sum().item() for k, v in model.state_dict().items()}
    return losses, weights


def main():
    out, steps = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result = {}
    for kind in ("plain", "full-rank", "compressed"):
        losses, weights = run(kind, steps, rank, world)
        gathered = [None] * world
        dist.all_gather_object(gathered, weights)
        result[kind] = {"losses": losses, "weights_per_rank": gathered}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    finish()


if __name__ == "__main__":
    main()
