"""Recipe (docs/retrofit.md): FSDP2; `memwrap.wrap(model)` before `fully_shard`, DCP checkpoints.

    torchrun --nproc_per_node 2 examples/retrofit_fsdp2.py [--memwrap-optimizer] [CHECKPOINT_DIR]
W and coords are both sharded on dim 0; the merge W += lift(coords) touches only each rank's rows.
"""

import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _retrofit_common import check, tiny_model, token_batches
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import memwrap


def build(use_memwrap_opt, mesh):
    model = tiny_model()
    memwrap.wrap(model, rank=4, granularity=2)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if use_memwrap_opt:
        optimizer = memwrap.optimizer(model, lr=3e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return model, optimizer


def main():
    use_memwrap_opt = "--memwrap-optimizer" in sys.argv
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    dist.init_process_group("gloo")  # "nccl" and init_device_mesh("cuda", ...) on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ckpt = args[0] if args else None
    if ckpt is None:
        holder = [tempfile.mkdtemp() if rank == 0 else None]
        dist.broadcast_object_list(holder)
        ckpt = holder[0]
    model, optimizer = build(use_memwrap_opt, mesh)
    losses = []
    for ids in token_batches(20):
        ids = ids.chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)

    model, optimizer = build(use_memwrap_opt, mesh)  # resume
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    memwrap.sync(optimizer)  # each layer back on the projection of the restored step (no-op for memwrap.optimizer)
    ids = token_batches(20)[0].chunk(world)[rank]
    with torch.no_grad():
        resumed = model(input_ids=ids, labels=ids).loss.item()
    if rank == 0:
        check(losses, f"FSDP2 on {world} ranks")
        print(f"resumed from {ckpt}: loss {resumed:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
