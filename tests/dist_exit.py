"""How the torchrun workers of the tests end (tests/test_ddp.py's `torchrun` reads what `finish` leaves).

A gloo rank can abort natively while torch tears its process group down (C++ worker threads destroyed during the
interpreter's finalization: "terminate called without an active exception", SIGABRT; pytorch#179291 describes it),
after every result has been written. `finish` records that this rank's work is complete, leaves the process group
in step with the other ranks, then ends the process without the interpreter's finalization."""

import os
import sys

import torch.distributed as dist

DONE_DIR = "MEMWRAP_TEST_DONE_DIR"  # set by the launcher: one file per rank that finished its work


def finish() -> None:
    done = os.environ.get(DONE_DIR)
    if done:  # this rank has written everything it writes
        with open(os.path.join(done, f"rank{dist.get_rank()}"), "w") as f:
            f.write("done\n")
    dist.barrier()  # past it, every rank's record is there whatever happens next
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
