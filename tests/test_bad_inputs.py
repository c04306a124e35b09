"""Bad input, as a new user types it: every case raises a MemwrapError subclass whose message says what to do, and
the model's state dict, module types and parameter dtypes are exactly as before. Then the same through the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_llama, token_batch
from torch import nn

import memwrap
from memwrap.cli import main as cli
from memwrap.errors import (
    AlreadyWrappedError,
    BudgetTooSmallError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    InvalidSettingsError,
    NoTargetsError,
    NotWrappedError,
    PlanMismatchError,
)


def _other_plan():
    other = tiny_llama(hidden=32)
    return memwrap.wrap(other, rank=2, granularity=2)


def _meta_model():
    with torch.device("meta"):
        return tiny_llama()


def _checkpoint_of_other_model(tmp):
    other = tiny_llama(hidden=32)
    memwrap.wrap(other, rank=2)
    return memwrap.save(other, os.path.join(tmp, "other"))


# (id, model: "plain" | "wrapped" | "unwrapped" (wrapped, then unwrapped) | "meta" | "nolinear",
#  call(model, tmp dir), error class, what the message must tell the user)
CASES = [
    # wrap: the model argument
    ("wrap-a-string", "plain", lambda m, t: memwrap.wrap("meta-llama/Llama-2-7b", rank=4), InvalidSettingsError,
     "load the model first"),
    ("wrap-none", "plain", lambda m, t: memwrap.wrap(None, rank=4), InvalidSettingsError, "takes the model"),
    ("wrap-twice", "wrapped", lambda m, t: memwrap.wrap(m, rank=4), AlreadyWrappedError, "call memwrap.unwrap"),
    ("wrap-meta-model", "meta", lambda m, t: memwrap.wrap(m, rank=4), InvalidSettingsError, "materialize them"),
    ("wrap-no-linears", "nolinear", lambda m, t: memwrap.wrap(m, rank=2), NoTargetsError, "targets="),
    ("wrap-targets-match-nothing", "plain", lambda m, t: memwrap.wrap(m, rank=2, targets=["zzz"]), NoTargetsError,
     "targets="),
    # wrap: numbers
    ("rank-zero", "plain", lambda m, t: memwrap.wrap(m, rank=0), InvalidSettingsError, "positive integer"),
    ("rank-negative", "plain", lambda m, t: memwrap.wrap(m, rank=-3), InvalidSettingsError, "positive integer"),
    ("rank-float", "plain", lambda m, t: memwrap.wrap(m, rank=1.5), InvalidSettingsError, "positive integer"),
    ("rank-string", "plain", lambda m, t: memwrap.wrap(m, rank="8"), InvalidSettingsError, "positive integer"),
    ("rank-huge", "plain", lambda m, t: memwrap.wrap(m, rank=10**6), InvalidSettingsError, "exceeds the block width"),
    ("granularity-not-divisor", "plain", lambda m, t: memwrap.wrap(m, rank=2, granularity=3), InvalidSettingsError,
     "use a d"),
    ("granularity-zero", "plain", lambda m, t: memwrap.wrap(m, rank=2, granularity=0), InvalidSettingsError,
     "positive integer"),
    ("budget-negative", "plain", lambda m, t: memwrap.wrap(m, budget_gb=-1), InvalidSettingsError, "positive number"),
    ("budget-nan", "plain", lambda m, t: memwrap.wrap(m, budget_gb=math.nan), InvalidSettingsError, "positive number"),
    ("budget-inf", "plain", lambda m, t: memwrap.wrap(m, budget_gb=math.inf), InvalidSettingsError, "positive number"),
    ("budget-string", "plain", lambda m, t: memwrap.wrap(m, budget_gb="24"), InvalidSettingsError, "positive number"),
    ("budget-impossible", "plain", lambda m, t: memwrap.wrap(m, budget_gb=1e-9), BudgetTooSmallError, "needs at least"),
    ("batch-size-zero", "plain", lambda m, t: memwrap.wrap(m, budget_gb=1, batch_size=0), InvalidSettingsError,
     "positive integer"),
    ("seq-len-negative", "plain", lambda m, t: memwrap.wrap(m, budget_gb=1, seq_len=-5), InvalidSettingsError,
     "positive integer"),
    ("refresh-every-zero", "plain", lambda m, t: memwrap.wrap(m, rank=2, refresh_every=0), InvalidSettingsError,
     "positive integer"),
    ("seed-negative", "plain", lambda m, t: memwrap.wrap(m, rank=2, seed=-1), InvalidSettingsError, "non-negative"),
    ("loss-chunk-float", "plain", lambda m, t: memwrap.wrap(m, rank=2, loss_chunk=1.5), InvalidSettingsError,
     "number of tokens"),
    ("checkpoint-layer-negative", "plain", lambda m, t: memwrap.wrap(m, rank=2, checkpoint_layers=[-1]),
     InvalidSettingsError, "non-negative integers"),
    ("checkpoint-layer-missing", "plain", lambda m, t: memwrap.wrap(m, rank=2, checkpoint_layers=[99]),
     InvalidSettingsError, "0 to 1"),
    # wrap: unknown names and wrong types
    ("projection-unknown", "plain", lambda m, t: memwrap.wrap(m, rank=2, projection="fourier"), InvalidSettingsError,
     "use one of"),
    ("norms-unknown", "plain", lambda m, t: memwrap.wrap(m, rank=2, norms="drop"), InvalidSettingsError, "use one of"),
    ("mlp-unknown", "plain", lambda m, t: memwrap.wrap(m, rank=2, mlp="fuse"), InvalidSettingsError, "use one of"),
    ("attention-unknown", "plain", lambda m, t: memwrap.wrap(m, rank=2, attention="int4"), InvalidSettingsError,
     "use one of"),
    ("head-unknown", "plain", lambda m, t: memwrap.wrap(m, rank=2, head="tied"), InvalidSettingsError, "use one of"),
    ("nonfinite-unknown", "plain", lambda m, t: memwrap.wrap(m, rank=2, nonfinite="warn"), InvalidSettingsError,
     "use one of"),
    ("activation-dtype-unknown", "plain", lambda m, t: memwrap.wrap(m, rank=2, activation_dtype="int3"),
     InvalidSettingsError, "use one of"),
    ("targets-not-strings", "plain", lambda m, t: memwrap.wrap(m, rank=2, targets=5), InvalidSettingsError,
     "list of strings"),
    ("stochastic-rounding-string", "plain", lambda m, t: memwrap.wrap(m, rank=2, stochastic_rounding="yes"),
     InvalidSettingsError, "True or False"),
    ("share-inputs-string", "plain", lambda m, t: memwrap.wrap(m, rank=2, share_inputs="no"), InvalidSettingsError,
     "True or False"),
    # wrap: conflicting options
    ("plan-and-rank", "plain", lambda m, t: memwrap.wrap(m, plan=_other_plan(), rank=2), InvalidSettingsError,
     "pass either plan="),
    ("plan-of-another-model", "plain", lambda m, t: memwrap.wrap(m, plan=_other_plan()), PlanMismatchError,
     "make the plan for this model"),
    ("plan-path-is-a-directory", "plain", lambda m, t: memwrap.wrap(m, plan=t), PlanMismatchError, "plan JSON file"),
    ("zero-stage-4", "plain", lambda m, t: memwrap.wrap(m, rank=2, zero=4), InvalidSettingsError, "1, 2 or 3"),
    ("world-size-without-zero", "plain", lambda m, t: memwrap.wrap(m, rank=2, world_size=2), InvalidSettingsError,
     "pass zero=1, 2 or 3"),
    ("offload-not-bool", "plain", lambda m, t: memwrap.wrap(m, rank=2, zero=2, offload_optimizer="yes"),
     InvalidSettingsError, "True or False"),
    # unwrap
    ("unwrap-unwrapped", "plain", lambda m, t: memwrap.unwrap(m), NotWrappedError, "call memwrap.wrap"),
    ("unwrap-twice", "unwrapped", lambda m, t: memwrap.unwrap(m), NotWrappedError,
     "call memwrap.wrap"),
    ("unwrap-a-string", "plain", lambda m, t: memwrap.unwrap("model"), InvalidSettingsError, "takes the model"),
    # optimizer
    ("optimizer-unwrapped", "plain", lambda m, t: memwrap.optimizer(m), NotWrappedError, "call memwrap.wrap"),
    ("optimizer-lr-negative", "wrapped", lambda m, t: memwrap.optimizer(m, lr=-1), InvalidSettingsError, "e.g. 1e-4"),
    ("optimizer-lr-nan", "wrapped", lambda m, t: memwrap.optimizer(m, lr=math.nan), InvalidSettingsError, "e.g. 1e-4"),
    ("optimizer-lr-string", "wrapped", lambda m, t: memwrap.optimizer(m, lr="1e-3"), InvalidSettingsError, "e.g. 1e-4"),
    ("optimizer-betas", "wrapped", lambda m, t: memwrap.optimizer(m, betas=(1.5, 0.9)), InvalidSettingsError,
     r"e.g. \(0.9, 0.999\)"),
    ("optimizer-one-beta", "wrapped", lambda m, t: memwrap.optimizer(m, betas=(0.9,)), InvalidSettingsError,
     r"e.g. \(0.9, 0.999\)"),
    ("optimizer-weight-decay-inf", "wrapped", lambda m, t: memwrap.optimizer(m, weight_decay=math.inf),
     InvalidSettingsError, "defaults"),
    ("optimizer-kind-unknown", "wrapped", lambda m, t: memwrap.optimizer(m, kind="sgd"), InvalidSettingsError,
     "use one of"),
    ("sync-not-an-optimizer", "wrapped", lambda m, t: memwrap.sync(m), InvalidSettingsError, "takes the optimizer"),
    # plan (config only)
    ("plan-unknown-model", "plain", lambda m, t: memwrap.plan("no-such-model-xyz", budget_gb=24), InvalidSettingsError,
     "pass a local directory"),
    ("plan-a-number", "plain", lambda m, t: memwrap.plan(7, budget_gb=24), InvalidSettingsError, "model name"),
    ("plan-budget-zero", "plain", lambda m, t: memwrap.plan("llama-2-7b", budget_gb=0), InvalidSettingsError,
     "positive number"),
    ("plan-budget-impossible", "plain", lambda m, t: memwrap.plan("llama-2-7b", budget_gb=0.001), BudgetTooSmallError,
     "larger device"),
    ("plan-dtype-unknown", "plain", lambda m, t: memwrap.plan("llama-2-7b", budget_gb=24, dtype="int4"),
     InvalidSettingsError, "use one of"),
    ("plan-file-missing", "plain", lambda m, t: memwrap.Plan.load(os.path.join(t, "none.json")), PlanMismatchError,
     "pass the path"),
    # save / load
    ("save-unwrapped", "plain", lambda m, t: memwrap.save(m, os.path.join(t, "c")), NotWrappedError,
     "call memwrap.wrap"),
    ("save-a-string", "plain", lambda m, t: memwrap.save("model", os.path.join(t, "c")), InvalidSettingsError,
     "takes the model"),
    ("save-to-a-file", "wrapped", lambda m, t: memwrap.save(m, __file__), InvalidSettingsError, "needs a directory"),
    ("save-optimizer-not-optimizer", "wrapped", lambda m, t: memwrap.save(m, os.path.join(t, "c"), optimizer={}),
     InvalidSettingsError, "torch.optim.Optimizer"),
    ("load-missing-directory", "plain", lambda m, t: memwrap.load(m, os.path.join(t, "nowhere")),
     CheckpointNotFoundError, "pass the directory"),
    ("load-directory-none", "plain", lambda m, t: memwrap.load(m, None), InvalidSettingsError, "directory path"),
    ("load-checkpoint-of-another-model", "plain", lambda m, t: memwrap.load(m, _checkpoint_of_other_model(t)),
     CheckpointMismatchError, "load it into the model"),
    ("load-optimizer-none", "wrapped", lambda m, t: memwrap.load_optimizer(None, t), InvalidSettingsError,
     "optimizer built over the wrapped model"),
    # getters on an unwrapped model
    ("get-plan-unwrapped", "plain", lambda m, t: memwrap.get_plan(m), NotWrappedError, "call memwrap.wrap"),
    ("report-unwrapped", "plain", lambda m, t: memwrap.report(m), NotWrappedError, "call memwrap.wrap"),
]


def _model(kind):
    if kind == "meta":
        return _meta_model()
    if kind == "nolinear":
        return nn.Sequential(nn.Embedding(16, 8), nn.ReLU())
    model = tiny_llama()
    if kind in ("wrapped", "unwrapped"):
        memwrap.wrap(model, rank=4, granularity=2)
    if kind == "unwrapped":
        memwrap.unwrap(model)
    return model


def _snapshot(model):
    return ({k: (v.clone() if v.device.type != "meta" else v.shape) for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()], [(n, p.dtype) for n, p in model.named_parameters()])


def test_the_table_has_forty_cases_or_more():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error_and_leaves_the_model(case, tmp_path):
    _, kind, call, error, hint = case
    model = _model(kind)
    before = _snapshot(model)
    with pytest.raises(error, match=hint) as err:
        call(model, str(tmp_path))
    assert isinstance(err.value, memwrap.MemwrapError)
    message = str(err.value)
    assert len(message) > 20 and message.rstrip().endswith((".", ")")), message
    after = _snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(before[0].values(), after[0].values()))
    if kind == "wrapped":  # the model still trains: nothing half-applied
        ids = token_batch()
        model(input_ids=ids, labels=ids).loss.backward()


CLI_CASES = [
    (["plan", "no-such-model-xyz", "--budget-gb", "24"], 2, "pass a local directory"),
    (["plan", "llama-2-7b", "--budget-gb", "-1"], 2, "must be positive"),
    (["plan", "llama-2-7b", "--budget-gb", "nan"], 2, "must be positive"),
    (["plan", "llama-2-7b", "--batch-size", "x"], 2, "whole number"),
    (["plan", "llama-2-7b", "--seq-len", "0"], 2, "must be positive"),
    (["plan", "llama-2-7b", "--budget-gb", "0.001"], 2, "larger device"),
    (["plan", "llama-2-7b", "--dtype", "int4"], 2, "use one of"),
    (["plan", "llama-2-7b", "--world-size", "2"], 2, "add --zero"),
    (["plan", "llama-2-7b", "--zero", "4"], 2, "is not one of"),
    (["demo", "--steps", "0"], 2, "x>=1"),
]


@pytest.mark.parametrize("args,code,hint", CLI_CASES, ids=[" ".join(c[0][:4]) for c in CLI_CASES])
def test_cli_bad_input_exits_with_a_message_not_a_traceback(args, code, hint):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert hint in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_cli_bad_input_as_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "memwrap.cli", "plan", "llama-2-7b", "--budget-gb", "0.001", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: nothing fits") and "larger device" in proc.stderr and not proc.stdout.strip()
