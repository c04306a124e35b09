"""DeepSpeed ZeRO 1/2/3 under the real `deepspeed` launcher (2 ranks, CPU accelerator, gloo).

Full rank (the identity projection) must train exactly like plain DeepSpeed; compressed, the run must equal the same
wrap trained in one process on both ranks' batches (DeepSpeed averages the ranks' gradients and clips at 1.0), with P
refreshed every 2 steps — so every update reaches W exactly once, on every rank, and the first moment is carried.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
from test_ddp import free_port, once_per_run

pytest.importorskip("deepspeed")

HERE = os.path.dirname(__file__)
FP32 = ["z1", "z2", "z3", "z3-shards", "z3-offload", "z2-accum"]
MOE = ["z3-qwen3-moe", "z3-gpt-oss"]
BF16 = ["z1-bf16", "z3-bf16"]  # stage 1 in bf16 runs DeepSpeed's BF16_Optimizer; 2 shares stage 1's fp32 code


def launch(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "--no_local_rank", script, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        remove_shm_buffers(port)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def remove_shm_buffers(port: int) -> int:
    """DeepSpeed's CPU all-reduce leaves one 69 MB shared-memory file per rank in /dev/shm, named after the uid, the
    address and the port, and never unlinks it: without this each launch would keep 138 MB of RAM until reboot."""
    found = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*")
    for path in found:
        os.remove(path)
    return len(found)


@pytest.fixture(scope="module")
def ds_result(tmp_path_factory):
    names = FP32 + BF16 + MOE + ["checkpoint:z2", "checkpoint:z3", "refusals", "trained-before"]
    out = once_per_run(tmp_path_factory, "deepspeed",
                       lambda d: launch(os.path.join(HERE, "dist_deepspeed.py"), str(d), ",".join(names)))
    return [json.load(open(out / f"rank{r}.json")) for r in (0, 1)]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.slow
@pytest.mark.parametrize("case", FP32 + MOE)
def test_full_rank_equals_plain_deepspeed(ds_result, case):
    for rank in ds_result:
        plain, full = rank[case]["plain"], rank[case]["full"]
        assert len(plain["losses"]) == 5
        assert max(rel(a, b) for a, b in zip(full["losses"], plain["losses"])) < 1e-5
        for name, w in plain["weights"].items():  # the dense weights themselves, not only the losses
            assert max(abs(a - b) for a, b in zip(full["weights"][name], w)) < 1e-5, name
        assert full["steps"] == [5] and full["coords_abs_max"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("case", FP32 + BF16)
def test_compressed_equals_one_process_run(ds_result, case):
    single = ds_result[0]["single"]  # fp32, one process, both ranks' batches, clipped at 1.0
    runs = [rank[case]["compressed"] for rank in ds_result]
    mean = [(a + b) / 2 for a, b in zip(runs[0]["losses"], runs[1]["losses"])]
    tol = 1e-5 if case in FP32 else 1e-2  # bf16: weights and activations round; the trajectory stays the same
    assert max(rel(a, b) for a, b in zip(mean, single)) < tol, (mean, single)
    assert mean[-1] < mean[0] - 0.5  # it learns, like the one-process run
    for run in runs:
        assert run["steps"] == [5] and run["refresh"] == [2]  # refreshed after steps 2 and 4
        assert run["coords_abs_max"] == 0.0  # every update merged, nothing left in coords or their master
        assert run["step_restored"]  # unwrap gave the engine's optimizer its own step back
    assert runs[0]["weights"] == runs[1]["weights"]  # every rank holds the same W


@pytest.mark.slow
@pytest.mark.parametrize("case", BF16)
def test_bf16_full_rank_tracks_plain(ds_result, case):
    """bf16: plain DeepSpeed keeps an fp32 master of W, memwrap rounds W stochastically; both stay together."""
    for rank in ds_result:
        plain, full = rank[case]["plain"], rank[case]["full"]
        assert max(rel(a, b) for a, b in zip(full["losses"], plain["losses"])) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["z2", "z3"])
def test_checkpoint_resumes_bit_exactly_and_exports(ds_result, stage):
    """engine.save_checkpoint after 3 steps, a fresh wrap + engine, load_checkpoint, 3 more steps: the same losses and
    W bit for bit as 6 straight steps (P refreshed after steps 2 and 4: the counters come back from the engine)."""
    for rank in ds_result:
        got = rank[f"checkpoint:{stage}"]
        assert got["got"] == got["want"] and got["weights_equal"]
        export = got["zero_to_fp32"]  # DeepSpeed's consolidated fp32 state dict loads into plain transformers
        assert export["clean"] and export["coords_zero"] and export["max_diff"] == 0.0
        if stage == "z2":  # memwrap.unwrap + save_pretrained, loaded with from_pretrained
            assert got["save_pretrained_max_diff"] == 0.0


@pytest.mark.slow
def test_what_cannot_be_exact_is_refused_before_any_step(ds_result):
    for rank in ds_result:
        got = rank["refusals"]
        assert all(v is not None and v.startswith("UnsupportedEngineError") for v in got.values()), got
        assert "FP16_UnfusedOptimizer" in got["bf16-no-zero"] and "ZeRO stages 1, 2 and 3" in got["bf16-no-zero"]
        assert "torch optimizer" in got["memwrap-optimizer"]
        assert "memwrap.deepspeed_attach(engine)" in got["module-called"]
        assert "8 bits" in got["int8-weights"] and "weights='keep'" in got["int8-weights"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["z1", "z2", "z3", "z3-shards", "z1-bf16", "z3-bf16"])
def test_planner_predicts_each_ranks_parameter_and_optimizer_bytes(ds_result, case):
    """The planner's DeepSpeed byte model (memwrap.planning.estimate.zero_bytes) against what the engines hold on each
    rank: parameters (their shards under ZeRO-3) and the fp32 master + AdamW moments, plain and compressed."""
    from tiny import tiny_llama

    import memwrap
    from memwrap.planning.estimate import ZeroSpec, enumerate_weights, zero_bytes

    stage = int(case[1])
    pb = 2 if "bf16" in case else 4
    weights = enumerate_weights(tiny_llama(), exclude=())
    layers = memwrap.wrap(tiny_llama(), rank=4, granularity=4, refresh_every=2).layers
    for kind, plan_layers in (("plain", None), ("compressed", layers)):
        params, _, states, _, _ = zero_bytes(weights, plan_layers, pb, ZeroSpec(stage, world_size=2))
        got = [rank[case][kind]["bytes"] for rank in ds_result]
        for measured in got:  # DeepSpeed pads each partition to an alignment: a few hundred bytes at most
            assert abs(measured["params"] - params) <= 4096, (kind, measured, params)
            assert abs(measured["states"] - states) <= 4096, (kind, measured, states)
        if kind == "compressed":
            plain = [rank[case]["plain"]["bytes"]["states"] for rank in ds_result]
            assert all(m["states"] < 0.6 * p for m, p in zip(got, plain))  # the point of it: coords-sized states


@pytest.mark.slow
@pytest.mark.parametrize("case", MOE)
def test_fused_experts_train_on_every_ranks_shard(ds_result, case):
    """Fused MoE experts ((E, n, m) and transposed (E, m, n) with bias) under ZeRO-3 with every weight sharded:
    compressed, P refreshed every 2 steps, the loss falls, nothing stays in coords and both ranks hold the same W."""
    runs = [rank[case]["compressed"] for rank in ds_result]
    for run in runs:
        assert run["steps"] == [5] and run["refresh"] == [2] and run["coords_abs_max"] == 0.0
        assert run["losses"][-1] < run["losses"][0] and run["moved"] > 0
    assert runs[0]["weights"] == runs[1]["weights"]


@pytest.mark.slow
def test_steps_taken_before_deepspeed_are_kept(ds_result):
    """A model trained 3 steps in a plain loop, then 2 under a fresh engine, is at step 5 (refresh index 2), not at
    the engine's count of 2."""
    for rank in ds_result:
        assert rank["trained-before"] == {"steps": [5], "refresh": [2]}
