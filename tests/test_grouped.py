"""The grouped step and merge (memwrap.compress.grouped): the same updates as one weight at a time, unbiased rounding,
and a number of kernels (and host syncs) per step that does not grow with the model's depth."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import tiny

import memwrap
from memwrap.compress import grouped, merge
from memwrap.optim import memwrap_optimizer as mo
from memwrap.planning.opcount import CountOps, count_step

FAMILIES = ["llama", "gpt2", "qwen3_moe"]  # dense, transposed (GPT-2's Conv1D), fused experts


def batch(step, vocab=128):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(step))


def trained(family, kind, steps=2, **opt_kw):
    model = tiny(family)
    memwrap.wrap(model, rank=4, granularity=2)
    opt = memwrap.optimizer(model, lr=1e-2, kind=kind, weight_decay=0.1, **opt_kw)
    for step in range(steps):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ids = batch(steps)
    model(input_ids=ids, labels=ids).loss.backward()
    return model, opt


def reference_step(model, opt, kind):
    """The next step of every compressed weight, one weight at a time, by the whole-weight formulas: W after it."""
    group = next(g for g in opt.param_groups if g["compressed"])
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    out = {}
    for unit in merge.units_of(model):
        p = unit.coords
        state = {k: v.clone() for k, v in opt.state[p].items()}
        step = int(state["step"]) + 1
        g = p.grad.float()
        state["exp_avg"].lerp_(g.to(state["exp_avg"].dtype), 1 - b1)
        if kind == "projfactor":
            update = mo._projfactor_update(unit, g, state, lr, b1, b2, eps, step)
        else:
            state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            u = state["exp_avg"].float() / (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**step)).add_(eps)
            update = unit.lifted(u * (-lr / (1 - b1**step)))
        w = unit.weight.detach().float().clone()
        w = w.transpose(-1, -2) if unit.transposed else w
        out[unit.layer_name] = w * (1 - lr * wd) + update
    return out


@pytest.mark.parametrize("kind", ["projfactor", "adamw"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [None, 4 * 64 * 20])  # one wave; or a few rows per piece, many waves
def test_grouped_step_equals_the_whole_weight_formulas(family, kind, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(grouped, "MERGE_CHUNK_BYTES", chunk)
    model, opt = trained(family, kind)
    expected = reference_step(model, opt, kind)
    opt.step()
    worst = 0.0
    for unit in merge.units_of(model):
        w = unit.weight.detach().float()
        w = w.transpose(-1, -2) if unit.transposed else w
        ref = expected[unit.layer_name]
        worst = max(worst, ((w - ref).norm() / ref.norm()).item())
    assert worst < 1e-6, worst


def test_many_waves_round_the_same_values_one_wave_rounds(monkeypatch):
    """Pieces of a few rows (a weight split over several waves, each with its own rounding draw) against one wave, one
    bf16 ProjFactor step from the same state: every weight element lands on one of the two bf16 neighbours of the same
    exact value (the two differ by at most one ulp, and do differ: other draws), and the same chunking is bit-identical."""
    def step(chunk):
        monkeypatch.setattr(grouped, "MERGE_CHUNK_BYTES", chunk)
        model = tiny("qwen3_moe").to(torch.bfloat16)
        memwrap.wrap(model, rank=4, granularity=2)
        opt = memwrap.optimizer(model, lr=1e-2, kind="projfactor")
        ids = batch(0)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        return {u.layer_name: u.weight.detach().float().clone() for u in merge.units_of(model)}

    one, many, again = step(1 << 40), step(4 * 64 * 20), step(4 * 64 * 20)
    assert all(torch.equal(many[n], again[n]) for n in many)
    differ = 0
    for name, w in one.items():
        ulp = (w.abs().clamp_min(1e-30).log2().floor() - 7).exp2()
        assert ((many[name] - w).abs() <= ulp * 1.001).all(), name
        differ += int((many[name] != w).sum())
    assert differ > 0


def test_grouped_merge_is_unbiased(monkeypatch):
    """A bf16 weight merged with a delta far below its resolution: over 400 draws (steps), the mean change of every
    weight equals the exact delta within 5 standard errors (each draw's error is within one ulp, variance ≤ ulp²/4);
    with the waves cut to a few rows, as for one wave."""
    monkeypatch.setattr(grouped, "MERGE_CHUNK_BYTES", 4 * 64 * 20)
    model = tiny("llama").to(torch.bfloat16)
    memwrap.wrap(model, rank=4, granularity=2)
    units = [u for u in merge.units_of(model) if u.layer_name.endswith(("q_proj", "o_proj"))]
    assert len({grouped.signature(u) for u in units}) == 1 and len(units) == 4  # one bucket
    assert len(grouped.waves_of(grouped.buckets_of(units))) > 1
    deltas = [torch.full_like(u.coords, 1e-5) for u in units]
    w0 = [u.weight.detach().clone() for u in units]
    exact = [u.lifted(d) for u, d in zip(units, deltas, strict=True)]
    trials = 400
    total = [torch.zeros_like(e) for e in exact]
    for step in range(1, trials + 1):
        for u, w in zip(units, w0, strict=True):
            u.weight.data.copy_(w)
        grouped.merge_many(units, deltas, 1.0, step)
        for t, u, w in zip(total, units, w0, strict=True):
            t.add_(u.weight.float() - w.float())
    for t, e, w in zip(total, exact, w0, strict=True):
        ulp = (w.float().abs().clamp_min(1e-30).log2().floor() - 7).exp2()
        sem = (ulp**2 / 4 / trials).sqrt()
        assert ((t / trials - e).abs() <= 5 * sem + 1e-12).float().mean() > 0.999
        assert abs((t / trials - e).mean().item()) < 5 * (sem**2).mean().sqrt().item() / math.sqrt(e.numel())


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_after_a_torch_optimizer_equals_one_weight_at_a_time(family):
    """memwrap's merge after torch AdamW's step (grouped) gives the weights a merge one weight at a time gives."""
    model = tiny(family)
    memwrap.wrap(model, rank=4, granularity=2)
    units = merge.units_of(model)
    deltas = [torch.randn_like(u.coords) * 1e-3 for u in units]
    twin = copy.deepcopy(model)
    grouped.merge_many(units, deltas, 0.99, 1)
    for u, d in zip(merge.units_of(twin), deltas, strict=True):
        u.merge(d, 0.99, 1)
    for a, b in zip(units, merge.units_of(twin), strict=True):
        assert torch.allclose(a.weight, b.weight, rtol=1e-6, atol=1e-7)


# ---- kernels and host syncs per step -------------------------------------------------------------------------
def llama(layers, hidden=128):
    from tiny import tiny_llama

    return tiny_llama(layers=layers, hidden=hidden, intermediate=hidden)


def step_counts(layers, how, family="llama", dtype=torch.float32):
    model = llama(layers) if family == "llama" else tiny(family) if layers == 2 else _deeper(family, layers)
    model = model.to(dtype)
    memwrap.wrap(model, rank=4, granularity=4)
    if how == "memwrap":
        opt = memwrap.optimizer(model, lr=1e-3)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    return count_step(model, opt, ids, ids)


def _deeper(family, layers):
    from families import CONFIGS
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **dict(CONFIGS[family], num_hidden_layers=layers)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the stochastic-rounding merge
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_memwrap_optimizer_step_kernels_do_not_grow_with_depth(family, dtype):
    two = step_counts(2, "memwrap", family, dtype)["optimizer"]
    eight = step_counts(8, "memwrap", family, dtype)["optimizer"]
    print(f"{family}: memwrap.optimizer step kernel ops, 2 layers {two.n_kernels}, 8 layers {eight.n_kernels}")
    assert eight.n_kernels <= 1.25 * two.n_kernels
    assert eight.n_kernels <= 120


def test_merge_after_torch_adamw_does_not_grow_with_depth():
    two, eight = step_counts(2, "torch")["optimizer"], step_counts(8, "torch")["optimizer"]
    assert eight.n_kernels <= 1.25 * two.n_kernels, (two.n_kernels, eight.n_kernels)


@pytest.mark.parametrize("layers", [2, 8])
def test_one_host_sync_per_training_step(layers):
    """Forward, backward and memwrap.optimizer's step read one device value (the non-finite flag, which also carries
    the forward's check of the coords at forwards 2 and 16), at every step from the second on."""
    model = llama(layers)
    memwrap.wrap(model, rank=4, granularity=4)
    opt = memwrap.optimizer(model, lr=1e-3)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    per_step = []
    for _ in range(18):
        with CountOps() as c:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        per_step.append(c.counts.n_syncs)
    assert max(per_step[1:]) == 1, per_step


def test_a_write_behind_autograds_back_is_still_caught_at_the_step():
    """The coords check rides on the step's one host read: a .data write before a checking forward (the third: the
    first one after wrap looks at the version counters instead) raises at that step, before anything is merged."""
    model = llama(2)
    memwrap.wrap(model, rank=4, granularity=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    unit = merge.units_of(model)[0]
    before = unit.weight.detach().clone()
    unit.coords.data.add_(1.0)  # behind autograd's back
    model(input_ids=ids, labels=ids).loss.backward()  # the check is taken, on the device
    with pytest.raises(memwrap.UnmergedUpdateError):
        opt.step()
    assert torch.equal(unit.weight.detach(), before)


def test_bench_gpu_speed_mode_runs_on_a_cpu_before_gpu_time_is_spent_on_it():
    """tools/bench_gpu.py --speed with a tiny shape on the CPU: both runs train and the ratio line is printed, so a
    lent GPU's minutes go to measuring, not to a crash in the script."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_gpu.py"), "--speed", "--device", "cpu",
                          "--shapes", "tiny", "--steps", "5"], capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    rows = {line.split()[1]: line.split() for line in lines if line.startswith("tiny ")}
    assert set(rows) == {"plain", "memwrap", "memwrap+cs"}
    assert all(float(rows[h][2]) > 0 for h in rows)  # step ms
    ratios = [line for line in lines if "ratio" in line]
    assert len(ratios) == 2 and float(ratios[0].split()[1].rstrip("x")) > 0


def test_a_tight_budget_gets_smaller_step_waves_not_more_compression(tmp_path):
    """Where the optimizer step is what would exceed the budget, the planner shrinks the step's waves (speed, not
    quality): the plan says so, its simulated steady-state step fits, and the wrapped model's waves obey it."""
    from tiny import tiny_llama

    from memwrap.compress.base import MERGE_CHUNK_BYTES

    tiny_llama().config.save_pretrained(tmp_path)
    roomy = memwrap.plan(str(tmp_path), budget_gb=1.0, batch_size=1, seq_len=8, dtype="fp32", device="cpu")
    tight = memwrap.plan(str(tmp_path), budget_gb=0.0016, batch_size=1, seq_len=8, dtype="fp32", device="cpu")
    assert roomy.step_wave_bytes == 0  # the default, MERGE_CHUNK_BYTES
    assert 0 < tight.step_wave_bytes < MERGE_CHUNK_BYTES
    assert any("waves of at most" in n for n in tight.notes)
    assert max(v for _, v in tight.phases) <= 0.0016e9
    assert [lp.r for lp in tight.layers] == [lp.r for lp in roomy.layers]  # the same compression
    model = tiny_llama()
    memwrap.wrap(model, plan=tight)
    units = merge.units_of(model)
    waves = grouped.waves_of(grouped.buckets_of(units))
    assert all(sum(p.numel for p in wave) * grouped.MERGE_BYTES_PER_ELEMENT <= tight.step_wave_bytes
               or len(wave) == 1 for wave in waves)
    assert len(waves) > 1


# ---- the fused write (memwrap.optimizer(compile_step=True)) ------------------------------------------------------
def test_hash_noise_is_uniform_16_bit_noise():
    """16 equal bins of the noise of 2**16 elements hold 1/16 each within 5 standard errors, for two seeds; the two
    seeds' draws are uncorrelated (|r| < 5/sqrt(n))."""
    n = 1 << 16
    draws = [grouped.hash_noise(n, torch.tensor(seed), "cpu") for seed in (1, 2)]
    for d in draws:
        assert int(d.min()) >= 0 and int(d.max()) < 1 << 16
        counts = torch.bincount(d.long() >> 12, minlength=16).float()
        sd = math.sqrt(n * (1 / 16) * (15 / 16))
        assert ((counts - n / 16).abs() < 5 * sd).all(), counts
    a, b = (d.double() - d.double().mean() for d in draws)
    r = (a * b).sum() / (a.norm() * b.norm())
    assert abs(r.item()) < 5 / math.sqrt(n)


def test_fused_rounding_is_unbiased():
    """fused_round(y, w, decay, seed) over 400 seeds: the mean of each element equals y + decay·w within 5 standard
    errors (each draw within one bf16 ulp)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, generator=g).bfloat16()
    y = torch.randn(4096, generator=g) * 1e-4
    decay = torch.tensor(0.999)
    exact = y + w.float() * decay
    trials = 400
    total = torch.zeros(4096, dtype=torch.float64)
    for seed in range(trials):
        total += grouped.fused_round(y, w, decay, torch.tensor(seed)).double()
    ulp = (exact.abs().log2().floor() - 7).exp2().double()
    sem = (ulp**2 / 4 / trials).sqrt()
    assert ((total / trials - exact.double()).abs() <= 5 * sem).float().mean() > 0.999


def test_compiled_step_rounds_the_values_the_eager_step_rounds():
    """memwrap.optimizer(compile_step=True) on a bf16 model: one step lands every weight element on one of the two bf16
    neighbours of the value the eager step rounds (within one ulp of it), and changes the weights like it does."""
    def one_step(compile_step):
        model = tiny("llama").to(torch.bfloat16)
        memwrap.wrap(model, rank=4, granularity=2)
        opt = memwrap.optimizer(model, lr=1e-2, weight_decay=0.1, compile_step=compile_step)
        ids = batch(0)
        model(input_ids=ids, labels=ids).loss.backward()
        before = {u.layer_name: u.weight.detach().float().clone() for u in merge.units_of(model)}
        opt.step()
        return before, {u.layer_name: u.weight.detach().float().clone() for u in merge.units_of(model)}

    before, eager = one_step(False)
    _, fused = one_step(True)
    assert grouped._COMPILED.get("fn") not in (None, grouped.fused_round)  # it ran compiled (no fallback)
    moved = 0
    for name, w in eager.items():
        ulp = (w.abs().clamp_min(1e-30).log2().floor() - 7).exp2()
        assert ((fused[name] - w).abs() <= ulp * 1.001).all(), name
        moved += int((fused[name] != before[name]).sum())
    assert moved > 0.5 * sum(w.numel() for w in eager.values())


def test_compile_step_must_be_a_bool():
    model = tiny("llama")
    memwrap.wrap(model, rank=4, granularity=2)
    with pytest.raises(memwrap.errors.InvalidSettingsError):
        memwrap.optimizer(model, compile_step="yes")


@pytest.mark.parametrize("bad", [-1, "64MB", 1.5, True])
def test_a_plan_file_with_a_bad_step_wave_bytes_is_refused(tmp_path, bad):
    """step_wave_bytes read from a plan file must be a non-negative integer: PlanMismatchError, nothing wrapped."""
    import json

    from tiny import tiny_llama

    model = tiny_llama()
    plan = memwrap.wrap(tiny_llama(), rank=4, granularity=2)  # a plan for this model, made on a twin
    data = json.loads(plan.to_json())
    data["step_wave_bytes"] = bad
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(memwrap.errors.PlanMismatchError, match="step_wave_bytes"):
        memwrap.wrap(model, plan=str(path))
    assert not merge.units_of(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
