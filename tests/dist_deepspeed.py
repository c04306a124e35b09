"""Worker for test_deepspeed.py, run by the `deepspeed` launcher (2 ranks, CPU accelerator, gloo).

For ZeRO stages 1, 2 and 3: a plain tiny Llama trains under deepspeed.initialize (the engine works here), and the
same model wrapped by memwrap is refused at its first forward with memwrap's error, before any step. Writes one
JSON per rank: {stage: {"plain_losses", "error", "weights_unchanged"}}.
"""

import json
import os
import sys

import deepspeed
import torch
from tiny import tiny_llama, token_batch

import memwrap

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}


def engine(model, stage):
    cfg = dict(CONFIG, zero_optimization={"stage": stage})
    params = [p for p in model.parameters() if p.requires_grad]
    return deepspeed.initialize(model=model, model_parameters=params, config=cfg)[0]


def main(out_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    result = {}
    for stage in (1, 2, 3):
        plain = engine(tiny_llama(), stage)
        losses = []
        for _ in range(3):
            ids = token_batch(2, 16, seed=rank)  # one batch, stepped on: its loss falls
            loss = plain(input_ids=ids, labels=ids).loss
            plain.backward(loss)
            plain.step()
            losses.append(loss.item())
        model = tiny_llama()
        memwrap.wrap(model, rank=4, granularity=4)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        wrapped = engine(model, stage)
        error = None
        try:
            ids = token_batch(2, 16, seed=rank)
            loss = wrapped(input_ids=ids, labels=ids).loss
            wrapped.backward(loss)
            wrapped.step()
        except memwrap.errors.MemwrapError as e:
            error = f"{type(e).__name__}: {e}"
        unchanged = None
        if stage < 3:  # ZeRO-3 partitions the parameters: the local tensors are shards
            unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        result[stage] = {"plain_losses": losses, "error": error, "weights_unchanged": unchanged}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
