"""memwrap.save / load: plain safetensors + plan JSON + weights_only optimizer state; resume; atomic under SIGKILL."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import resume_worker
import torch
from safetensors.torch import load_file
from tiny import tiny_llama, token_batch

import memwrap
from memwrap.integrations.checkpoint import recover, verify

WORKER = os.path.join(os.path.dirname(__file__), "checkpoint_worker.py")


def batch(step):
    return token_batch(seed=100 + step % 3)


def build(opt_kind, model=None):
    model = model if model is not None else tiny_llama(seed=0)
    if not memwrap.compress.inject.is_wrapped(model):
        memwrap.wrap(model, rank=4, granularity=2, refresh_every=4, seed=3)
    if opt_kind == "memwrap":
        return model, memwrap.optimizer(model, lr=3e-3, weight_decay=0.1)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def train(model, opt, steps):
    return resume_worker.train(model, opt, steps, batch)


@pytest.mark.parametrize("how", ["helpers", "by-hand"])
@pytest.mark.parametrize("opt_kind", ["adamw", "memwrap"])
def test_save_load_resume_equals_uninterrupted_run(tmp_path, opt_kind, how):
    """Resume = new model (other init) + weights + wrap(plan=saved plan) + optimizer state loaded weights_only.

    "helpers": memwrap.load + memwrap.load_optimizer; "by-hand": the same with safetensors, Plan.load and torch.load."""
    full = train(*build(opt_kind), range(12))
    model, opt = build(opt_kind)
    first = train(model, opt, range(6))
    ckpt = memwrap.save(model, tmp_path / "ckpt", optimizer=opt)
    fresh = tiny_llama(seed=7)
    if how == "helpers":
        plan = memwrap.load(fresh, ckpt)
    else:
        fresh.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")))
        plan = memwrap.Plan.load(os.path.join(ckpt, "memwrap_plan.json"))
        memwrap.wrap(fresh, plan=plan)
    assert plan == memwrap.get_plan(model)
    fresh, opt2 = build(opt_kind, fresh)
    if how == "helpers":
        memwrap.load_optimizer(opt2, ckpt)
    else:
        opt2.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True))
        memwrap.sync(opt2)
    second = train(fresh, opt2, range(6, 12))
    assert first + second == full  # bit-identical on CPU


def test_saved_files_are_plain_safetensors_plan_json_and_weights_only_state(tmp_path):
    model, opt = build("adamw")
    plain_keys = set(tiny_llama(seed=0).state_dict())
    train(model, opt, range(3))
    out = memwrap.save(model, tmp_path / "ckpt", optimizer=opt)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "memwrap_manifest.json",
                                       "memwrap_plan.json", "memwrap_state.json", "model.safetensors", "optimizer.pt"]
    with open(os.path.join(out, "memwrap_manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format_version"] == 1 and sorted(manifest["files"]) == sorted(
        n for n in os.listdir(out) if n != "memwrap_manifest.json")
    for name, entry in manifest["files"].items():
        data = open(os.path.join(out, name), "rb").read()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert set(load_file(os.path.join(out, "model.safetensors"))) == plain_keys
    with open(os.path.join(out, "memwrap_plan.json")) as f:
        assert memwrap.Plan.from_dict(json.load(f)) == memwrap.get_plan(model)
    state = torch.load(os.path.join(out, "optimizer.pt"), weights_only=True)
    assert {int(s["step"]) for s in state["state"].values()} == {3}
    assert not any("memwrap_step" in s for s in state["state"].values())  # memwrap's counters are its own
    with open(os.path.join(out, "memwrap_state.json")) as f:
        assert set(json.load(f)["steps"].values()) == {3}
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = token_batch(seed=9)
    model.eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)


def test_plain_save_pretrained_plus_plan_resumes_with_load(tmp_path):
    model, opt = build("adamw")
    train(model, opt, range(2))
    model.save_pretrained(tmp_path / "hf")
    memwrap.get_plan(model).save(tmp_path / "hf" / "memwrap_plan.json")
    fresh = tiny_llama(seed=5)
    memwrap.load(fresh, tmp_path / "hf")
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert memwrap.get_plan(fresh) == memwrap.get_plan(model)


def test_tied_embeddings_and_plain_modules_round_trip(tmp_path):
    """A tied lm_head is stored once by safetensors and restored by the tie; a non-transformers module saves too."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    def tied_llama(seed):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True))

    tied = tied_llama(0)
    memwrap.wrap(tied, rank=4, granularity=2)
    memwrap.save(tied, tmp_path / "tied")
    back = tied_llama(3)
    memwrap.load(back, tmp_path / "tied")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(tied.state_dict().values(), back.state_dict().values()))

    def mlp(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    net = mlp(0)
    memwrap.wrap(net, rank=2, granularity=2, exclude=())
    memwrap.save(net, tmp_path / "mlp")
    assert set(load_file(tmp_path / "mlp" / "model.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    other = mlp(1)
    memwrap.load(other, tmp_path / "mlp")
    x = torch.randn(4, 16)
    assert torch.equal(other(x), net(x))


def test_save_refuses_foreign_directory_and_load_names_missing_files(tmp_path):
    model, _ = build("adamw")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(memwrap.InvalidSettingsError, match="new or empty directory"):
        memwrap.save(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    memwrap.save(model, tmp_path / "ckpt")
    with pytest.raises(memwrap.CheckpointError, match="pass optimizer= to memwrap.save"):
        memwrap.load_optimizer(torch.optim.AdamW(model.parameters()), tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "hf-only")
    with pytest.raises(memwrap.CheckpointError, match="get_plan"):
        memwrap.load(tiny_llama(), tmp_path / "hf-only")
    with pytest.raises(memwrap.CheckpointError, match="does not match"):
        memwrap.load(tiny_llama(hidden=32), tmp_path / "ckpt")
    other = tiny_llama()
    memwrap.wrap(other, rank=2, granularity=2)
    before = [t.clone() for t in other.state_dict().values()]
    with pytest.raises(memwrap.PlanMismatchError, match="unwrap"):
        memwrap.load(other, tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(before, other.state_dict().values()))  # nothing was loaded


STAGES = [("weights", "v1"), ("optimizer", "v1"), ("manifest", "v1"), ("between-renames", "v1"), ("renamed", "v2")]


def run_worker(out, mode, names):
    """One worker process; each kill happens in a child it forks (checkpoint_worker.py). Returns each child's end."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, WORKER, str(out), mode, ",".join(map(str, names))], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "status.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory):
    out = tmp_path_factory.mktemp("killed")
    return out, run_worker(out, "stages", [stage for stage, _ in STAGES])


@pytest.mark.parametrize("stage,survivor", STAGES)
def test_sigkill_mid_save_leaves_a_complete_checkpoint(killed_saves, stage, survivor):
    """The worker saves v1, then is SIGKILLed inside the save of v2; the directory loads as v1 (v2 once renamed)."""
    out, status = killed_saves
    assert status[stage] == signal.SIGKILL
    ref = out / stage
    ckpt = ref / "ckpt"
    expected = torch.load(ref / f"{survivor}.pt", weights_only=True)
    other = torch.load(ref / ("v2.pt" if survivor == "v1" else "v1.pt"), weights_only=True)
    fresh = tiny_llama(seed=4)
    memwrap.load(fresh, ckpt)  # recovers the interrupted swap first, then checks every file against the manifest
    assert verify(ckpt)
    got = fresh.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not all(torch.equal(got[k], other[k]) for k in expected)
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in opt_state["state"].values()} == {int(survivor[1])}
    with open(ckpt / "memwrap_state.json") as f:
        assert set(json.load(f)["steps"].values()) == {int(survivor[1])}
    assert sorted(os.listdir(ref)) == sorted(["ckpt", "v1.pt", "v2.pt"])  # no .tmp-* or .old left behind


def test_sigkill_at_a_random_moment_of_repeated_saves(tmp_path):
    """Kill a process that saves in a loop at arbitrary times: the checkpoint is always one whole version."""
    delays = (0.05, 0.23, 0.41)
    status = run_worker(tmp_path, "loop", delays)
    assert list(status.values()) == [signal.SIGKILL] * len(delays)
    for i in range(len(delays)):
        ckpt = tmp_path / f"loop-{i}" / "ckpt"
        recover(ckpt)
        weights = load_file(ckpt / "model.safetensors")
        versions = {float(t.flatten()[0]) for t in weights.values()} | {float(t.flatten()[-1]) for t in weights.values()}
        assert len(versions) == 1 and versions.pop() >= 1
        assert memwrap.load_plan(ckpt).layers
