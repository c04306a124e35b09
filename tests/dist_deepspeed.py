"""Worker for test_deepspeed.py, run by the `deepspeed` launcher (2 ranks, CPU accelerator, gloo).

For each case in CASES (ZeRO stage, dtype, options), trains the same tiny Llama for STEPS steps three ways under
deepspeed.initialize — plain, wrapped at full rank (must equal plain), wrapped compressed (P refreshed every 2 steps)
— and records losses, the dense weights at the end (whole, gathered under ZeRO-3), the coords (must be zero after
every step) and memwrap's step counters. Writes rank{r}.json.
"""

import json
import os
import sys

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from test_moe import full_rank
from tiny import tiny_llama, token_batch

import memwrap
from memwrap.integrations.deepspeed import engine_bytes

STEPS = 5
CASES = {
    "z1": {"stage": 1}, "z2": {"stage": 2}, "z3": {"stage": 3},
    "z3-shards": {"stage": 3, "zero": {"stage3_param_persistence_threshold": 0}},  # W never whole between steps
    "z2-bf16": {"stage": 2, "bf16": True}, "z1-bf16": {"stage": 1, "bf16": True},
    "z3-bf16": {"stage": 3, "bf16": True},
    "z2-offload": {"stage": 2, "zero": {"offload_optimizer": {"device": "cpu"}}},  # ZeRO-Offload: states on the CPU
    "z3-offload": {"stage": 3, "zero": {"offload_optimizer": {"device": "cpu"}}},
    "z2-accum": {"stage": 2, "accumulate": 2},  # gradient accumulation: the step (and merge) every 2nd micro-batch
    # fused MoE experts, ZeRO-3 with every weight sharded: Qwen3-MoE ((E, n, m) experts), GPT-OSS (transposed, biased)
    "z3-qwen3-moe": {"stage": 3, "family": "qwen3_moe", "zero": {"stage3_param_persistence_threshold": 0}},
    "z3-gpt-oss": {"stage": 3, "family": "gpt_oss", "zero": {"stage3_param_persistence_threshold": 0}},
}


def build(case: dict):
    if "family" in case:
        from families import tiny

        return tiny(case["family"])
    return tiny_llama(seed=0)


def config(case: dict) -> dict:
    accumulate = case.get("accumulate", 1)
    cfg = {"train_micro_batch_size_per_gpu": 2 // accumulate, "gradient_accumulation_steps": accumulate,
           "steps_per_print": 10**6,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
           "zero_optimization": dict({"stage": case["stage"]}, **case.get("zero", {}))}
    if "offload_optimizer" in case.get("zero", {}):  # torch AdamW, not DeepSpeedCPUAdam (a C++ build)
        cfg["zero_force_ds_cpu_optimizer"] = False
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    return cfg


def weights(engine) -> dict:
    """The module's parameters, whole (gathered under ZeRO-3), without memwrap's coords."""
    params = dict(engine.module.named_parameters())
    with GatheredParameters(list(params.values()), enabled=hasattr(next(iter(params.values())), "ds_id")):
        return {k: v.detach().float().clone() for k, v in params.items() if not k.endswith("coords")}


def coords_abs_max(engine) -> float:
    params = [p for n, p in engine.module.named_parameters() if n.endswith("coords")]
    with GatheredParameters(params, enabled=bool(params) and hasattr(params[0], "ds_id")):
        return max((float(p.detach().abs().max()) for p in params), default=0.0)


def batch(rank: int, step: int, vocab: int = 256) -> torch.Tensor:
    """Two batches per rank, alternating: the loss falls."""
    return token_batch(2, 16, vocab=vocab, seed=100 * (step % 2) + rank)


def single(rank: int, world: int) -> list[float]:
    """The compressed run in one process with torch AdamW on every rank's batch at once: what DeepSpeed must match
    (it averages the ranks' gradients, every rank's batch has as many tokens, and it clips at 1.0 by default)."""
    model = tiny_llama(seed=0)
    memwrap.wrap(model, rank=4, granularity=4, refresh_every=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        ids = torch.cat([batch(r, step) for r in range(world)])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def run(kind: str, case: dict, rank: int) -> dict:
    model = build(case)
    if kind == "full":
        memwrap.wrap(model, plan=full_rank(memwrap.wrap(build(case), rank=4, granularity=2)))
    elif kind == "compressed":
        memwrap.wrap(model, rank=4, granularity=4, refresh_every=2)
    engine = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  config=config(case))[0]
    start = weights(engine)
    losses, coords = [], []
    vocab = engine.module.config.vocab_size
    for step in range(STEPS):
        micro = []
        for ids in batch(rank, step, vocab).chunk(case.get("accumulate", 1)):  # the engine steps on the last one
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            micro.append(loss.item())
        losses.append(sum(micro) / len(micro))
        coords.append(coords_abs_max(engine))
    end = weights(engine)
    units = memwrap.compress.merge.units_of(engine.module)
    out = {"losses": losses, "coords_abs_max": max(coords, default=0.0),
           "moved": max(float((end[k] - start[k]).abs().max()) for k in end),
           "steps": sorted({u.steps for u in units}), "refresh": sorted({u.refresh_index for u in units}),
           "bytes": engine_bytes(engine),
           "weights": {k: v.flatten()[:64].tolist() for k, v in end.items()}}
    if kind != "plain":
        memwrap.unwrap(engine.module)
        out["step_restored"] = "step" not in engine.optimizer.__dict__
    return out


def compressed_engine(case: dict, optimizer=None, weights="keep"):
    model = tiny_llama(seed=0)
    memwrap.wrap(model, rank=4, granularity=4, refresh_every=2, weights=weights)
    params = [p for p in model.parameters() if p.requires_grad]
    return deepspeed.initialize(model=model, model_parameters=params, config=config(case), optimizer=optimizer)[0]


def train(engine, steps: range, rank: int) -> list[float]:
    losses = []
    for step in steps:
        ids = batch(rank, step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def checkpoint(name: str, out_dir: str, rank: int) -> dict:
    """6 steps straight vs 3 steps, save_checkpoint, a fresh wrap + engine, load_checkpoint, 3 steps: equal bit for bit
    (P refreshes after steps 2 and 4, so the resumed run must come back at refresh index 1 mid-interval). Then the
    zero_to_fp32 output and, after unwrap, save_pretrained load into plain transformers with the same weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    case, ckpt = CASES[name], os.path.join(out_dir, f"ckpt-{name}")
    straight = compressed_engine(case)
    want = train(straight, range(6), rank)
    want_w = weights(straight)
    first = compressed_engine(case)
    got = train(first, range(3), rank)
    first.save_checkpoint(ckpt, tag="step3")
    resumed = compressed_engine(case)
    resumed.load_checkpoint(ckpt, tag="step3")
    got += train(resumed, range(3, 6), rank)
    got_w = weights(resumed)
    resumed.save_checkpoint(ckpt, tag="step6")
    torch.distributed.barrier()
    out = {"want": want, "got": got, "weights_equal": all(torch.equal(want_w[k], got_w[k]) for k in want_w)}
    consolidated = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="step6")
    plain = tiny_llama(seed=0)
    extra = plain.load_state_dict({k: v for k, v in consolidated.items() if not k.endswith(".coords")}, strict=True)
    out["zero_to_fp32"] = {"clean": not extra.missing_keys and not extra.unexpected_keys,
                           "coords_zero": all(not v.any() for k, v in consolidated.items() if k.endswith(".coords")),
                           "max_diff": max(float((plain.state_dict()[k].float() - got_w[k]).abs().max()) for k in got_w)}
    if case["stage"] < 3:
        memwrap.unwrap(resumed.module)
        if rank == 0:
            resumed.module.save_pretrained(os.path.join(out_dir, f"hf-{name}"))
        torch.distributed.barrier()
        loaded = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, f"hf-{name}"))
        out["save_pretrained_max_diff"] = max(float((loaded.state_dict()[k].float() - got_w[k]).abs().max())
                                              for k in got_w)
    return out


def trained_before(rank: int) -> dict:
    """3 steps with torch AdamW in this process, then 2 under a fresh ZeRO-2 engine: the engine's count starts at 0,
    the layers keep their 3 (P refreshed every 2 steps: index 2 after 5 steps)."""
    model = tiny_llama(seed=0)
    memwrap.wrap(model, rank=4, granularity=4, refresh_every=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        ids = batch(rank, step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    params = [p for p in model.parameters() if p.requires_grad]
    engine = deepspeed.initialize(model=model, model_parameters=params, config=config({"stage": 2}))[0]
    train(engine, range(3, 5), rank)
    units = memwrap.compress.merge.units_of(engine.module)
    return {"steps": sorted({u.steps for u in units}), "refresh": sorted({u.refresh_index for u in units})}


def refusals(rank: int) -> dict:
    """What cannot be made exact is refused at the first forward, before any step, naming what is supported."""
    out = {}

    def attempt(key, make, call=lambda e, ids: e(input_ids=ids, labels=ids)):
        try:
            engine = make()
            ids = batch(rank, 0)
            loss = call(engine, ids).loss
            engine.backward(loss)
            engine.step()
            out[key] = None
        except memwrap.errors.MemwrapError as e:
            out[key] = f"{type(e).__name__}: {e}"

    attempt("bf16-no-zero", lambda: compressed_engine({"stage": 0, "bf16": True}))
    attempt("memwrap-optimizer", lambda: deepspeed.initialize(
        model=(m := wrapped()), optimizer=memwrap.optimizer(m, lr=1e-2),
        config=dict(config({"stage": 2}), zero_allow_untested_optimizer=True))[0])
    attempt("module-called", lambda: compressed_engine({"stage": 2}), call=lambda e, ids: e.module(input_ids=ids,
                                                                                                  labels=ids))
    attempt("int8-weights", lambda: compressed_engine({"stage": 2}, weights="int8"))
    return out


def wrapped():
    model = tiny_llama(seed=0)
    memwrap.wrap(model, rank=4, granularity=4)
    return model


def main(out_dir: str, names: list[str]) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    result = {}
    for name in names:
        if name.startswith("checkpoint:"):
            result[name] = checkpoint(name.split(":")[1], out_dir, rank)
        elif name == "refusals":
            result[name] = refusals(rank)
        elif name == "trained-before":
            result[name] = trained_before(rank)
        else:
            result[name] = {kind: run(kind, CASES[name], rank) for kind in ("plain", "full", "compressed")}
    if rank == 0:
        result["single"] = single(rank, torch.distributed.get_world_size())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
