"""DDP under real torchrun (2 ranks, gloo, CPU): same P on every rank, losses equal the single-process run on the
same global batch, and the all-reduced gradient bytes (measured by a comm hook) are the compressed size."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from dist_ddp import build, run_single
from dist_exit import DONE_DIR

WORKER = os.path.join(os.path.dirname(__file__), "dist_ddp.py")
STEPS = 7  # P refreshed every 3 steps: two refreshes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, timeout=240, attempts=3):
    """Two gloo ranks on loopback. A rank that dies by a native abort (SIGABRT: gloo's transport, or torch's teardown of
    the process group; seen on loaded machines) is not a failed check: if every rank had finished its work
    (tests/dist_exit.py's `finish`, after all results were written) the launch counts as done, otherwise it is
    relaunched, up to `attempts` times. Any Python error or failed check in a rank fails at once."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as done:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), script, *map(str, args)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(env, **{DONE_DIR: done}))
            finished = sorted(os.listdir(done)) == ["rank0", "rank1"]
        aborted = "exitcode: -6" in proc.stderr  # SIGABRT; a Python error in a rank exits with 1 and is not retried
        if proc.returncode != 0 and aborted and finished:
            print(f"torchrun: a rank aborted natively after every rank had finished its work:\n{proc.stderr[-1500:]}")
            return proc
        if proc.returncode == 0 or not aborted or attempt == attempts - 1:
            break
        print(f"torchrun: a rank aborted natively before the work was done, relaunching:\n{proc.stderr[-1500:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def once_per_run(tmp_path_factory, name: str, launch) -> Path:
    """The directory where `launch(directory)` wrote a multi-process run's results, launched once per test run.

    The README runs the tests with `--dist loadfile`, so a module's tests, which share its launch, stay on one
    pytest-xdist worker. Whatever the distribution (pytest 9.2 with pytest-xdist 3.8 silently ignores `xdist_group`
    marks under `--dist loadgroup`: pytest-xdist#1386), the first worker that needs a launch runs it and any other
    waits for it and reads the same files: two launches side by side would only load the machine twice over."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        out = tmp_path_factory.mktemp(name)
        launch(out)
        return out
    from filelock import FileLock  # (a dependency of torch)

    root = tmp_path_factory.getbasetemp().parent  # this run's directory, shared by its workers
    out, complete = root / name, root / f"{name}.complete"
    with FileLock(str(root / f"{name}.lock")):
        if not complete.exists():  # (a launch that failed on another worker is tried again here)
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            launch(out)
            complete.touch()
    return out


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory):
    out = once_per_run(tmp_path_factory, "ddp", lambda d: torchrun(WORKER, d / "ddp.json", STEPS)) / "ddp.json"
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adamw", "memwrap", "plain"])
def test_ddp_losses_equal_single_process_with_same_global_batch(ddp_result, kind):
    ranks = ddp_result[kind]
    single = run_single(kind, STEPS)
    diff = max(abs(a - b) for a, b in zip(ranks[0]["losses"], single))
    print(f"{kind}: DDP vs single-process max |loss difference| {diff:.3g}")
    assert diff < 1e-5
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"]  # the ranks' weights stayed bit-identical
    assert single[-1] < single[0]


@pytest.mark.slow
def test_ddp_gradient_accumulation_with_no_sync_equals_one_big_batch(ddp_result):
    """Each rank: 2 micro-batches, the first under ddp.no_sync(); one all-reduce of compressed bytes per step."""
    accum, plain_step = ddp_result["adamw-accum"], ddp_result["adamw"]
    single = run_single("adamw", STEPS)
    assert max(abs(a - b) for a, b in zip(accum[0]["losses"], single)) < 1e-5
    assert accum[0]["weight_checksum"] == accum[1]["weight_checksum"]
    assert accum[0]["bytes_per_step"] == plain_step[0]["bytes_per_step"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adamw", "memwrap"])
def test_ddp_ranks_draw_identical_projections_across_refreshes(ddp_result, kind):
    a, b = (r["projection_checks"] for r in ddp_result[kind])
    assert a == b
    assert ddp_result[kind][0]["refresh_index"] == (STEPS // 3)
    assert a[-1] != a[0]  # P did change at the refreshes


@pytest.mark.slow
def test_ddp_allreduces_only_compressed_gradients(ddp_result):
    mem, plain = ddp_result["adamw"][0], ddp_result["plain"][0]
    plan = memwrap_plan()
    exact_rest = plain["trainable_bytes"] - plan.grad_bytes(compressed=False)  # embeddings, norms, lm_head
    assert set(plain["bytes_per_step"]) == {plain["trainable_bytes"]}
    assert set(mem["bytes_per_step"]) == {plan.grad_bytes(compressed=True) + exact_rest}
    assert set(ddp_result["memwrap"][0]["bytes_per_step"]) == set(mem["bytes_per_step"])
    linear_ratio = (mem["bytes_per_step"][0] - exact_rest) / (plain["bytes_per_step"][0] - exact_rest)
    total_ratio = mem["bytes_per_step"][0] / plain["bytes_per_step"][0]
    print(f"all-reduced bytes per step: memwrap {mem['bytes_per_step'][0]}, plain DDP {plain['bytes_per_step'][0]} "
          f"(ratio {total_ratio:.3f}); wrapped linears alone {mem['bytes_per_step'][0] - exact_rest} vs "
          f"{plain['bytes_per_step'][0] - exact_rest} (ratio {linear_ratio:.4f})")
    assert linear_ratio == pytest.approx(1 / 9, rel=0.01)  # c·r = 8 of m = 64 (and 8 of 128 for down_proj)
    assert total_ratio < 0.4


@pytest.mark.slow
def test_ddp_trains_int8_weights_like_one_process(ddp_result):
    """int8 base weights under DDP: the 8-bit values and scales are broadcast once, the ranks' weights stay bit-identical
    (every rank rounds the same all-reduced update with the same stream), and the losses follow the one-process run
    (gradients summed in another order may move a rare stochastic rounding by one grid step: 1e-3, not 1e-5)."""
    ranks = ddp_result["memwrap-int8"]
    single = run_single("memwrap-int8", STEPS)
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"]
    assert max(abs(a - b) for a, b in zip(ranks[0]["losses"], single)) < 1e-3
    assert single[-1] < single[0] - 0.1
    assert set(ranks[0]["bytes_per_step"]) == set(ddp_result["memwrap"][0]["bytes_per_step"])  # the same compressed


def memwrap_plan():
    import memwrap

    model, _ = build("adamw")
    return memwrap.get_plan(model)


@pytest.mark.parametrize("when,launches,accepted", [("after-finish", 1, True), ("before-finish", 2, False),
                                                    ("python-error", 1, False)])
def test_torchrun_accepts_a_native_abort_only_after_every_rank_finished(tmp_path, when, launches, accepted):
    """The launcher's retry rule, on a rank script that needs no process group: an abort after both ranks recorded
    their work as done is accepted, an abort before is relaunched and then fails, a Python error fails at once."""
    script = tmp_path / "rank.py"
    script.write_text(f"""import os, sys, time
rank = os.environ["LOCAL_RANK"]
with open(os.path.join(sys.argv[1], "launches"), "a") as f:
    f.write(rank)
if {when!r} == "python-error":
    raise SystemExit(1)
if {when!r} == "after-finish":  # as dist_exit.finish: record, wait for the other rank's record, then abort
    done = os.environ[{DONE_DIR!r}]
    open(os.path.join(done, "rank" + rank), "w").close()
    while len(os.listdir(done)) < 2:
        time.sleep(0.05)
os.abort()
""")
    if accepted:
        torchrun(script, tmp_path, attempts=2)
    else:
        with pytest.raises(AssertionError):
            torchrun(script, tmp_path, attempts=2)
    assert len((tmp_path / "launches").read_text()) == 2 * launches  # each launch starts both ranks


def test_a_launch_runs_once_per_test_run_whichever_worker_needs_it(tmp_path, monkeypatch):
    """once_per_run under pytest-xdist: two workers that need the same launch at the same time get one launch and
    the same results; a launch that failed is tried again by the next worker that needs it."""
    import threading
    import time

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")

    class Factory:  # what tmp_path_factory gives a worker: its own directory inside the run's directory
        def __init__(self, run: Path, worker: str):
            self.base = run / f"popen-{worker}"
            self.base.mkdir(parents=True)

        def getbasetemp(self) -> Path:
            return self.base

    def race(run: Path, fail_first: bool):
        launches, outs, errors = [], [], []

        def launch(out):
            launches.append(out)
            time.sleep(0.3)  # long enough for the other worker to arrive while it runs
            if fail_first and len(launches) == 1:
                raise AssertionError("the launch failed")
            (out / "result.json").write_text(str(len(launches)))

        def worker(name):
            try:
                outs.append(once_per_run(Factory(run, name), "launch", launch))
            except Exception as e:  # noqa: BLE001 - checked below: only the failed launch's own error
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(w,)) for w in ("gw0", "gw1")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return launches, outs, errors

    launches, outs, errors = race(tmp_path / "ok", fail_first=False)
    assert len(launches) == 1 and not errors and outs == [tmp_path / "ok" / "launch"] * 2
    launches, outs, errors = race(tmp_path / "failed", fail_first=True)
    assert len(launches) == 2 and [str(e) for e in errors] == ["the launch failed"]
    assert outs == [tmp_path / "failed" / "launch"]
    assert (outs[0] / "result.json").read_text() == "2"
