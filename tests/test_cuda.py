"""On a CUDA GPU (skipped without one): a plan holds its budget as the card, and its predicted steady-state peak is
what torch.cuda.max_memory_allocated measures from step 2 on."""

import pytest
import torch

import memwrap

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(cfg).to(device="cuda", dtype=torch.bfloat16)


def test_a_small_model_fits_under_a_cap_equal_to_its_budget_and_the_steady_peak_is_predicted():
    """4 steps under set_per_process_memory_fraction(budget / total) without running out of memory; from step 2 on,
    max_memory_allocated per step (peaks reset at each step's start) is the plan's peak within 3%."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    model = small_llama()
    budget_gb = 1.6
    plan = memwrap.wrap(model, budget_gb=budget_gb, batch_size=4, seq_len=1024)
    parts = dict(plan.memory)
    assert {"cuda context", "allocator headroom"} <= parts.keys()
    assert parts["peak"] + parts["cuda context"] + parts["allocator headroom"] <= budget_gb * 1e9
    torch.cuda.set_per_process_memory_fraction(budget_gb * 1e9 / total, device)
    try:
        opt = memwrap.optimizer(model, lr=1e-4)
        g = torch.Generator(device="cpu").manual_seed(0)
        peaks = []
        for _ in range(4):
            ids = torch.randint(0, 32000, (4, 1024), generator=g).to(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    for measured in peaks[1:]:
        assert abs(measured - parts["peak"]) <= 0.03 * parts["peak"], (peaks, parts["peak"])


def test_simulation_matches_the_device_phase_by_phase():
    """memwrap.simulate's per-phase peaks (a meta copy) = max_memory_allocated after each phase, within 3%."""
    device = torch.device("cuda")
    model = small_llama()
    plan = memwrap.wrap(small_llama(), rank=8, granularity=4, checkpoint_layers="all", loss_chunk=512)
    sim = memwrap.simulate(model, plan, batch_size=4, seq_len=1024, steps=3)
    memwrap.wrap(model, plan=plan)
    opt = memwrap.optimizer(model, lr=1e-4)
    ids = torch.zeros(4, 1024, dtype=torch.long, device=device)
    for step in range(3):
        torch.cuda.reset_peak_memory_stats(device)
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize(device)
        measured = {"forward": torch.cuda.max_memory_allocated(device)}
        loss.backward()
        del loss
        torch.cuda.synchronize(device)
        measured["backward"] = torch.cuda.max_memory_allocated(device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        measured["optimizer"] = torch.cuda.max_memory_allocated(device)
        for phase, want in sim.steps[step].items():
            assert abs(measured[phase] - want) <= 0.03 * want, (step, phase, measured, sim.steps[step])
