"""torch.compile of wrapped models: one graph, no breaks, compiled training equal to eager across projection refreshes
with no recompilation (the projection P is a tensor rewritten in place, never a Python constant of the graph)."""

import pytest
import torch
import torch._dynamo as dynamo
import torch._dynamo.testing  # noqa: F401  (CompileCounterWithBackend)
from families import tiny
from test_adapters import tiny_bert

import memwrap

FAMILIES = ["llama", "gpt2", "bert", "qwen3_moe", "mixtral"]
OPTIONS = {"recompute": {"mlp": "recompute", "attention": "recompute", "checkpoint_layers": [1]},
           "int8": {"attention": "int8", "head": "compress", "loss_chunk": 16}}


def build(family, seed=0):
    model = tiny_bert() if family == "bert" else tiny(family, seed=seed)
    if family == "gpt2":  # transformers logs (and so breaks the graph) on every call while GPT-2's loss_type is unset,
        model.loss_type = "ForCausalLM"  # plain GPT-2 the same: not memwrap's break
    return model


def batch(step=0):
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(step))


def rel(a, b):
    a, b = a.float(), b.float()  # (8-bit weights: their grid values)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("family,option", [("gpt2", "recompute"), ("bert", "recompute"), ("qwen3_moe", "recompute"),
                                           ("llama", "int8"), ("qwen3_moe", "int8")])
def test_a_wrapped_model_compiles_to_one_graph(family, option):
    """The whole-layer options too (the default on all five families, and every exact option on Llama, compile with
    fullgraph=True in the training test below; Mixtral's experts run the code Qwen3-MoE's do)."""
    model = build(family)
    memwrap.wrap(model, rank=4, granularity=2, **OPTIONS[option])
    ids = batch()
    explained = dynamo.explain(lambda i: model(input_ids=i, labels=i).loss)(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [str(b.reason)[:300] for b in
                                                                          explained.break_reasons]


# every exact option at once (8-bit attention is lossy: a 1-ulp difference in q can flip one rounding to 8 bits, so
# compiled and eager runs of it agree in loss, not bit-near in weights; its graph is checked above)
EVERY_OPTION = {"mlp": "recompute", "attention": "recompute", "checkpoint_layers": [1], "head": "compress",
                "loss_chunk": 16}


@pytest.mark.parametrize("family,options", [(f, {}) for f in FAMILIES] + [("llama", EVERY_OPTION),
                                                                        ("llama", {"weights": "int8"}),
                                                                        ("qwen3_moe", {"weights": "fp8"})],
                         ids=FAMILIES + ["llama-every-option", "llama-int8-weights", "qwen3_moe-fp8-weights"])
def test_compiled_training_equals_eager_across_refreshes_without_recompiling(family, options):
    """5 steps of memwrap's optimizer with P refreshed every 2 steps: compiled (fullgraph, AOTAutograd) losses and
    final weights equal eager ones within 1e-5, and the model was compiled exactly once. With 8-bit weights the
    compiled graph dequantizes them and the merge rounds them stochastically on the same streams as eager."""
    dynamo.reset()
    runs = []
    for compiled in (False, True):
        model = build(family)
        memwrap.wrap(model, rank=4, granularity=2, refresh_every=2, **options)
        opt = memwrap.optimizer(model, lr=1e-2)
        counter = dynamo.testing.CompileCounterWithBackend("aot_eager")
        forward = torch.compile(model, fullgraph=True, backend=counter) if compiled else model
        losses = []
        for step in range(5):
            ids = batch(step)
            loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim > 1}
        runs.append((losses, weights, counter.frame_count))
    (eager_losses, eager_w, _), (losses, w, frames) = runs
    assert frames == 1  # refreshes at steps 2 and 4 recompiled nothing
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, eager_losses, strict=True)), (losses, eager_losses)
    assert max(rel(w[n], eager_w[n]) for n in w) <= 1e-5


def _scaled_rotary(self, q, k, cos, sin, unsqueeze_dim=1):
    """A stand-in for a hub kernel that `kernels.kernelize` would put on a layer's private rotary wrapper: rotary
    embedding, then q and k scaled by 8, so an output shows whether the layer's own wrapper ran or the global function."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    return 8 * (q * cos + rotate_half(q) * sin), 8 * (k * cos + rotate_half(k) * sin)


def _kernelized_llama():
    import types

    model = build("llama")
    for layer in model.model.layers:
        funcs = layer.self_attn.__dict__.get("_kernel_funcs")
        if not funcs:
            pytest.skip("this transformers routes no function through `kernels` (use_kernelized_func)")
        for wrapper in funcs.values():
            wrapper.forward = types.MethodType(_scaled_rotary, wrapper)  # what kernelize does: an instance forward
    return model


def test_kernels_routing_runs_inside_recomputed_regions_and_compiles_to_one_graph():
    """`kernels` (a requirement of newer transformers) routes apply_rotary_pos_emb to each attention's private wrapper
    through a context variable its forward writes. memwrap writes it outside its recomputed regions (a checkpointed
    layer, a recomputed attention), so torch.compile sees no side effect there: one graph, 0 breaks. The routing
    itself is kept: with a stand-in kernel on every wrapper, eager, compiled, forward and recompute all run it
    (loss and gradients equal the plain kernelized model's), and unwrap removes every instance forward."""
    pytest.importorskip("kernels")
    options = {"attention": "recompute", "checkpoint_layers": [1]}
    ids = batch()

    def loss_and_grads(model, forward=None):
        loss = (model if forward is None else forward)(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "coords" not in n}
        return loss.item(), grads

    plain_loss, plain_grads = loss_and_grads(_kernelized_llama())
    _, unrouted_grads = loss_and_grads(build("llama"))  # the stand-in kernel shows in the gradients:
    assert max(rel(unrouted_grads[n], plain_grads[n]) for n in plain_grads) > 0.1  # 1e-5 below is a real test

    model = _kernelized_llama()
    memwrap.wrap(model, rank=4, granularity=2, **options)
    loss, grads = loss_and_grads(model)
    assert abs(loss - plain_loss) <= 1e-6 * abs(plain_loss)
    assert grads and max(rel(grads[n], plain_grads[n]) for n in grads) <= 1e-5  # all but the compressed weights

    model = _kernelized_llama()
    memwrap.wrap(model, rank=4, granularity=2, **options)
    explained = dynamo.explain(lambda i: model(input_ids=i, labels=i).loss)(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [str(b.reason)[:300] for b in
                                                                          explained.break_reasons]
    dynamo.reset()
    compiled_loss, compiled_grads = loss_and_grads(model, torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert abs(compiled_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    assert compiled_grads.keys() == grads.keys()
    assert max(rel(compiled_grads[n], plain_grads[n]) for n in grads) <= 1e-5

    memwrap.unwrap(model)
    assert not any("forward" in m.__dict__ for m in model.modules() if "_kernel_funcs" in m.__dict__)
