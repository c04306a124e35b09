"""Worker for test_checkpoint: processes that die by SIGKILL in the middle of memwrap.save.

usage: checkpoint_worker.py OUT stages NAME,NAME,...   per stage, in OUT/NAME/: save v1, train, save v2 and die by
                                                       SIGKILL at `save` stage NAME
       checkpoint_worker.py OUT loop DELAY,DELAY,...   per delay, in OUT/loop-I/: save versions 1, 2, 3, ... (every
                                                       weight = the version) and die by SIGKILL DELAY s after "saved 1"

Each save that dies runs in a child forked from this process (torch is imported and the model built once, not once per
kill); the child is a whole process killed with SIGKILL, so what it leaves on disk is what any killed process leaves.
OUT/status.json records how each child ended.
"""

import json
import os
import signal
import sys
import time

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


def in_child(work) -> int:
    """Run work() in a forked child; return the signal that ended it (0 when it exited instead)."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(3)  # not killed: never return into the parent's code
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def stage_run(out, name) -> int:
    directory, ckpt = os.path.join(out, name), os.path.join(out, name, "ckpt")
    os.makedirs(directory)
    model = tiny_llama(seed=0)
    memwrap.wrap(model, rank=4, granularity=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = token_batch()
    for version in (1, 2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        torch.save(model.state_dict(), os.path.join(directory, f"v{version}.pt"))
        if version == 1:
            memwrap.save(model, ckpt, optimizer=opt)

    def save_and_die():
        memwrap.integrations.checkpoint._stage = die_at(name)
        memwrap.save(model, ckpt, optimizer=opt)
    return in_child(save_and_die)


def loop_run(out, index, delay) -> int:
    model = tiny_llama(seed=0)
    memwrap.wrap(model, rank=4, granularity=2)
    ckpt = os.path.join(out, f"loop-{index}", "ckpt")
    read, write = os.pipe()

    def save_forever():
        os.close(read)
        version = 0
        while True:
            version += 1
            with torch.no_grad():
                for t in model.state_dict().values():
                    t.fill_(version)
            memwrap.save(model, ckpt)
            if version == 1:
                os.write(write, b"1")
    pid = os.fork()
    if pid == 0:
        try:
            save_forever()
        finally:
            os._exit(3)
    os.close(write)
    if os.read(read, 1) != b"1":  # the child died before its first save completed
        os.waitpid(pid, 0)
        return -1
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(read)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def main():
    out, mode, names = sys.argv[1:4]
    torch.set_num_threads(1)  # no OpenMP worker threads exist when a child is forked
    if mode == "stages":
        status = {name: stage_run(out, name) for name in names.split(",")}
    else:
        status = {str(i): loop_run(out, i, float(d)) for i, d in enumerate(names.split(","))}
    with open(os.path.join(out, "status.json"), "w") as f:
        json.dump(status, f)


if __name__ == "__main__":
    main()
