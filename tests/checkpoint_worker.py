"""Worker for test_checkpoint: save a checkpoint, then die in the middle of the next save.

usage: checkpoint_worker.py DIR REF_DIR stage NAME   save v1, train, save v2 and SIGKILL itself at `save` stage NAME
       checkpoint_worker.py DIR REF_DIR loop         save versions 1, 2, 3, ... (every weight = version) until killed
"""

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import tiny_llama, token_batch  # noqa: E402

import memwrap  # noqa: E402
import memwrap.integrations.checkpoint  # noqa: E402


def die_at(name):
    def stage(current):
        if current == name:
            os.kill(os.getpid(), signal.SIGKILL)
    return stage


def main():
    directory, ref, mode = sys.argv[1:4]
    torch.set_num_threads(1)
    model = tiny_llama(seed=0)
    memwrap.wrap(model, rank=4, granularity=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = token_batch()
    if mode == "stage":
        for version in (1, 2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            torch.save(model.state_dict(), os.path.join(ref, f"v{version}.pt"))
            if version == 2:
                memwrap.integrations.checkpoint._stage = die_at(sys.argv[4])
            memwrap.save(model, directory, optimizer=opt)
        return
    version = 0
    while True:
        version += 1
        with torch.no_grad():
            for t in model.state_dict().values():
                t.fill_(version)
        memwrap.save(model, directory)
        if version == 1:
            print("saved 1", flush=True)


if __name__ == "__main__":
    main()
