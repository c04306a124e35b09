"""torchrun worker for test_ddp (2 ranks, gloo, CPU); also imported by the test for the single-process reference.

usage: torchrun --nproc_per_node 2 dist_ddp.py OUT_JSON STEPS
Writes, from rank 0: losses (mean over ranks of each step's loss, i.e. the global-batch loss) for memwrap with
torch AdamW, memwrap with memwrap.optimizer, the plain model and memwrap + AdamW with gradient accumulation;
all-reduced gradient bytes per step measured by a DDP comm hook; checksums of every projection P and of the final
weights on every rank.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from dist_exit import finish  # noqa: E402
from tiny import tiny_llama  # noqa: E402

import memwrap  # noqa: E402
from memwrap.compress.linear import CompressedLinear  # noqa: E402

GLOBAL_BATCH, SEQ, REFRESH = 8, 32, 3


def global_batch(step):
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(500 + step % 4))


def build(kind):
    """kind: 'adamw' (memwrap + torch AdamW), 'memwrap' (memwrap + memwrap.optimizer), 'plain' (no memwrap, AdamW),
    'memwrap-int8' (memwrap.optimizer, the wrapped weights stored in int8)."""
    model = tiny_llama(seed=0)
    if kind != "plain":
        memwrap.wrap(model, rank=4, granularity=2, refresh_every=REFRESH, seed=1,
                     weights="int8" if kind.endswith("int8") else "keep")
    if kind.startswith("memwrap"):
        return model, memwrap.optimizer(model, lr=3e-3, weight_decay=0.1)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)


def step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return loss.detach()


def accumulated_step(ddp, opt, ids):
    first, second = ids.chunk(2)
    with ddp.no_sync():
        loss_a = ddp(input_ids=first, labels=first).loss
        (loss_a / 2).backward()
    loss_b = ddp(input_ids=second, labels=second).loss
    (loss_b / 2).backward()
    torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return (loss_a.detach() + loss_b.detach()) / 2


def run_single(kind, steps):
    model, opt = build(kind)
    return [step(model, opt, global_batch(s)).item() for s in range(steps)]


def projection_checksum(model) -> list[float]:
    groups = {id(m.group): m.group for m in model.modules() if isinstance(m, CompressedLinear)}
    return [float(g.projection(m_index).double().sum()) + 1e3 * float(g.projection(m_index).double().abs().max())
            for g in groups.values() for m_index in (0, g.refresh_index)]


def counting_allreduce(counter):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        buf = bucket.buffer()
        counter[0] += buf.numel() * buf.element_size()
        return allreduce_hook(state, bucket)

    return hook


def run_ddp(kind, steps, rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    accum = kind.endswith("-accum")  # 2 micro-batches per rank and step, the first under no_sync()
    model, opt = build(kind.removesuffix("-accum"))
    ddp = DDP(model)
    counter = [0]
    ddp.register_comm_hook(None, counting_allreduce(counter))
    losses, bytes_per_step, checks = [], [], []
    per_rank = GLOBAL_BATCH // world
    for s in range(steps):
        ids = global_batch(s)[rank * per_rank:(rank + 1) * per_rank]
        before = counter[0]
        if accum:
            loss = accumulated_step(ddp, opt, ids)
        else:
            loss = step(ddp, opt, ids)
        bytes_per_step.append(counter[0] - before)
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        if kind != "plain":
            checks.append(projection_checksum(model))
    weights = torch.cat([t.double().flatten() for t in model.state_dict().values()])
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return dict(losses=losses, bytes_per_step=bytes_per_step, projection_checks=checks,
                weight_checksum=[float(weights.sum()), float(weights.square().sum())], trainable_bytes=trainable_bytes,
                refresh_index=max((m.refresh_index for m in model.modules() if isinstance(m, CompressedLinear)), default=0))


def main():
    out, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for kind in ("adamw", "memwrap", "plain", "adamw-accum", "memwrap-int8"):
        mine = run_ddp(kind, steps, rank, world)
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        result[kind] = gathered
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    finish()


if __name__ == "__main__":
    main()
