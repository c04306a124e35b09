"""Worker for test_reliability's determinism test: train 20 steps from a seed, print hashes of what it produced.

usage: determinism_worker.py SEED  -> one JSON line {optimizer/dtype: {"projections", "losses", "weights"}}
"""

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import tiny_llama, token_batch  # noqa: E402

import memwrap  # noqa: E402
from memwrap.compress.merge import units_of  # noqa: E402


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16
                 else t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(seed: int, kind: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(seed)
    model = tiny_llama(seed=seed).to(dtype)
    memwrap.wrap(model, rank=4, granularity=2, refresh_every=5, seed=seed)
    opt = memwrap.optimizer(model, lr=3e-3) if kind == "memwrap" else torch.optim.AdamW(model.parameters(), lr=3e-3)
    projections, losses = [], []
    for step in range(20):
        ids = token_batch(seed=seed * 1000 + step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        projections += [u.group.projection(u.refresh_index) for u in units_of(model)]
    return {"projections": digest(projections), "losses": losses, "weights": digest(model.state_dict().values())}


if __name__ == "__main__":
    torch.set_num_threads(1)
    seed = int(sys.argv[1])
    print(json.dumps({f"{kind}/{str(dtype)[6:]}": run(seed, kind, dtype)
                      for kind in ("memwrap", "adamw") for dtype in (torch.float32, torch.bfloat16)}))
