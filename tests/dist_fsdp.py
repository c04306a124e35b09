"""torchrun worker for test_fsdp: FSDP2 (fully_shard, 2 CPU ranks) on wrapped tiny models; DCP checkpoint + resume.

usage: torchrun --nproc_per_node 2 dist_fsdp.py OUT_DIR STEPS SPLIT CONFIG [CONFIG ...]
       CONFIG: MODEL:OPT[:bf16], MODEL dense | moe, OPT adamw (torch) | projfactor | projfactor-ef | subspace (memwrap.optimizer),
       bf16: FSDP2 mixed precision (bf16 parameters in compute, fp32 gradient reduction); int8 / fp8: wrap(weights=...)
For each config: train STEPS steps on the global batch split over ranks, saving a DCP checkpoint after SPLIT steps;
then build a fresh sharded model and optimizer, load the checkpoint and train the remaining steps. Rank 0 writes
OUT_DIR/CONFIG.json (losses of both runs, local shard shapes) and OUT_DIR/CONFIG.pt (full weights at the end).
The single-process reference (`run_single`) is imported by the test.
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
from memwrap.compress.base import local  # noqa: E402
from memwrap.compress.linear import CompressedLinear  # noqa: E402

GLOBAL_BATCH, SEQ, REFRESH = 8, 32, 3


def tiny_moe(seed=0):
    """A tiny Qwen2-MoE: routed experts (fused 3-D parameters) plus a shared expert of ordinary linears."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
    return AutoModelForCausalLM.from_config(cfg)


def global_batch(step):
    return torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(500 + step % 4))


def build(model_kind, opt_kind, weights="keep"):
    model = tiny_llama(seed=0) if model_kind == "dense" else tiny_moe(seed=0)
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=REFRESH, seed=1, weights=weights)
    return model


def make_optimizer(model, opt_kind):
    if opt_kind == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
    kind = "adamw" if opt_kind == "subspace" else "projfactor"  # memwrap.optimizer: ProjFactor or subspace AdamW
    return memwrap.optimizer(model, lr=3e-3, weight_decay=0.1, kind=kind, error_feedback=opt_kind == "projfactor-ef")


def step(model, opt, ids, collectives=None):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if collectives is None:
        opt.step()
    else:
        collectives.append(count_collectives(opt.step))
    opt.zero_grad()
    return loss.detach()


def count_collectives(fn) -> int:
    """Collectives issued while fn() runs (CommDebugMode sees DTensor redistributions and direct c10d calls alike)."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        fn()
    return comm.get_total_counts()


def run_single(model_kind, opt_kind, steps, weights="keep"):
    """(losses, final state dict) of the same training on one process."""
    model = build(model_kind, opt_kind, weights)
    opt = make_optimizer(model, opt_kind)
    losses = [step(model, opt, global_batch(s)).item() for s in range(steps)]
    return losses, model.state_dict()


def shard(model, mesh, bf16=False):
    """fully_shard per decoder layer, then the root; bf16: MixedPrecisionPolicy (bf16 compute, fp32 reduce)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def train_ranks(model, opt, steps, rank, world, collectives=None):
    per_rank = GLOBAL_BATCH // world
    losses = []
    for s in steps:
        loss = step(model, opt, global_batch(s)[rank * per_rank:(rank + 1) * per_rank], collectives)
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses


def run_config(out_dir, steps, split, config, mesh, rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    model_kind, opt_kind, *extra = config.split(":")
    bf16 = "bf16" in extra
    weights = next((w for w in ("int8", "fp8") if w in extra), "keep")
    ckpt = os.path.join(out_dir, config.replace(":", "-") + "-dcp")
    model = shard(build(model_kind, opt_kind, weights), mesh, bf16)
    opt = make_optimizer(model, opt_kind)
    layer = next(m for m in model.modules() if isinstance(m, CompressedLinear))
    shapes = dict(coords=list(local(layer.coords).shape), weight=list(local(layer.weight).shape),
                  coords_global=list(layer.coords.shape), weight_global=list(layer.weight.shape))
    collectives = []  # per optimizer step (the merge included)
    full = train_ranks(model, opt, range(split), rank, world, collectives)
    try:
        memwrap.save(model, os.path.join(out_dir, "not-for-fsdp"))
        save_error = ""
    except memwrap.InvalidSettingsError as e:
        save_error = str(e)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    full += train_ranks(model, opt, range(split, steps), rank, world)
    final = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    fresh = shard(build(model_kind, opt_kind, weights), mesh, bf16)  # fresh = same init; load must overwrite the trained state
    opt2 = make_optimizer(fresh, opt_kind)
    msd, osd = get_state_dict(fresh, opt2)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(fresh, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    memwrap.sync(opt2)
    resumed = train_ranks(fresh, opt2, range(split, steps), rank, world)
    final_resumed = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        name = os.path.join(out_dir, config.replace(":", "-"))
        torch.save({"full": final, "resumed": final_resumed}, name + ".pt")
        with open(name + ".json", "w") as f:
            json.dump(dict(losses=full, resumed=resumed, shapes=shapes, refresh_index=layer.refresh_index,
                           step_collectives=collectives, save_error=save_error,
                           compressed_layers=sum(isinstance(m, CompressedLinear) for m in model.modules())), f)


def main():
    out_dir, steps, split, configs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for config in configs:
        run_config(out_dir, steps, split, config, mesh, dist.get_rank(), dist.get_world_size())
    finish()


if __name__ == "__main__":
    main()
