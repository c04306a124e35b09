import os

import torch

# Two cores are shared by every test process; one thread each keeps runs predictable.
torch.set_num_threads(int(os.environ.get("MEMWRAP_TEST_THREADS", "1")))
