import os

import torch

# Two cores are shared by every test process; one thread each keeps runs predictable.
torch.set_num_threads(int(os.environ.get("MEMWRAP_TEST_THREADS", "1")))

# The fast pass CI runs at the declared floors (`pytest -m floor`, .ci/run): every test module that reads torch or
# transformers internals (fused experts of every MoE family, attention and cache helpers, loss functions, torch.compile,
# optimizer hooks, FSDP2, the Trainer, checkpoints, the meta-tensor simulation). The whole suite runs on the newest releases.
FLOOR_MODULES = {"test_moe", "test_compile", "test_blocks", "test_layers", "test_wrap", "test_adapters", "test_trainer",
                 "test_layout", "test_estimate", "test_update_path", "test_checkpoint", "test_reliability",
                 "test_training", "test_fsdp", "test_cli", "test_versions", "test_simulate", "test_grouped", "test_quant"}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in FLOOR_MODULES:
            item.add_marker(pytest.mark.floor)
