"""CompressedLinear: exact dX and db, coords.grad = G·P, full rank = exact, unbiasedness, dtypes."""

import math

import pytest
import torch
from torch import nn

import memwrap
from memwrap.compress.base import stochastic_round_bf16
from memwrap.compress.linear import CompressedLinear
from memwrap.compress.projection import estimator_relative_variance


class Two(nn.Module):
    def __init__(self, m=32, n=24, bias=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(m, n, bias=bias)


def exact_and_wrapped(m=32, n=24, bias=True, rank=4, granularity=2, **kw):
    ref = Two(m, n, bias)
    model = Two(m, n, bias)
    memwrap.wrap(model, rank=rank, granularity=granularity, exclude=(), **kw)
    return ref, model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_input_and_bias_gradients_are_exact(bias, shape):
    ref, model = exact_and_wrapped(bias=bias)
    x = torch.randn(*shape, 32, dtype=torch.float64).float()
    dy = torch.randn(*shape, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref.proj(x1), model.proj(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    (y1 * dy).sum().backward()
    (y2 * dy).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    if bias:
        torch.testing.assert_close(model.proj.bias.grad, ref.proj.bias.grad, rtol=1e-6, atol=1e-6)
    assert model.proj.weight.grad is None  # no full-size weight gradient ever exists


def test_coords_gradient_is_weight_gradient_projected():
    ref, model = exact_and_wrapped(rank=4, granularity=2)
    x, dy = torch.randn(10, 32), torch.randn(10, 24)
    (ref.proj(x) * dy).sum().backward()
    (model.proj(x) * dy).sum().backward()
    layer = model.proj
    p = layer.group.projection()  # (d, r)
    g = ref.proj.weight.grad  # (n, m)
    expected = g.reshape(24, 2, 16) @ p  # G reshaped to (n, c, d) times P: (n, c, r)
    torch.testing.assert_close(layer.coords.grad, expected, rtol=1e-5, atol=1e-5)
    # and its lift is G P Pᵀ
    torch.testing.assert_close(layer.lifted(layer.coords.grad), (g.reshape(24, 2, 16) @ p @ p.T).reshape(24, 32),
                               rtol=1e-5, atol=1e-5)


def test_full_rank_step_equals_exact_step():
    """r = d: one step of torch AdamW on coords, merged into W, equals one AdamW step on W."""
    ref, model = exact_and_wrapped(rank=16, granularity=2)
    x, dy = torch.randn(10, 32), torch.randn(10, 24)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for mod, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            (mod.proj(x) * dy).sum().backward()
            o.step()
    torch.testing.assert_close(model.proj.weight, ref.proj.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.proj.bias, ref.proj.bias, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(model.proj.coords) == 0


def test_full_rank_sgd_step_equals_exact_for_every_projection_kind():
    """SGD is rotation-invariant, so at r = d any projection with P Pᵀ = I gives the exact step."""
    ref, model = exact_and_wrapped(rank=16, granularity=2)
    x, dy = torch.randn(10, 32), torch.randn(10, 24)
    for mod in (ref, model):
        o = torch.optim.SGD(mod.parameters(), lr=0.1)
        (mod.proj(x) * dy).sum().backward()
        o.step()
    torch.testing.assert_close(model.proj.weight, ref.proj.weight, rtol=1e-6, atol=1e-6)


def _lifted_gradient_draws(kind: str, draws: int, m=32, n=8, c=2, r=4):
    """Exact G and `draws` lifted estimates Ĝ = lift(G_s), each with a fresh P (refresh index k)."""
    torch.manual_seed(1)
    ref = nn.Linear(m, n)
    x, dy = torch.randn(20, m), torch.randn(20, n)
    (ref(x) * dy).sum().backward()
    g = ref.weight.grad.clone()
    layer = Two(m, n).proj
    layer.weight.data.copy_(ref.weight.data)
    holder = nn.Sequential(layer)
    memwrap.wrap(holder, rank=r, granularity=c, projection=kind, exclude=())
    cl = holder[0]
    out = []
    for k in range(draws):
        cl.refresh_index = cl.group.refresh_index = k
        cl.coords.grad = None
        (cl(x) * dy).sum().backward()
        out.append(cl.lifted(cl.coords.grad))
    memwrap.unwrap(holder)
    return g, torch.stack(out)


@pytest.mark.parametrize("kind", ["stiefel", "gaussian", "rademacher"])
def test_lifted_gradient_is_unbiased(kind):
    """‖mean of K draws − G‖² has expectation v‖G‖²/K with v the estimator's relative variance."""
    draws = 400
    g, est = _lifted_gradient_draws(kind, draws)
    v = estimator_relative_variance(16, 4, kind)
    err = ((est.mean(0) - g) ** 2).sum() / (g**2).sum()
    expected = v / draws
    # the squared error is a sum of many roughly independent terms: within a factor 2 of its mean
    assert expected / 2 < err < 2 * expected, (kind, err.item(), expected)


def test_stiefel_variance_below_gaussian_and_matches_formula():
    draws = 300
    res = {}
    for kind in ("stiefel", "gaussian"):
        g, est = _lifted_gradient_draws(kind, draws)
        per_draw = ((est - g) ** 2).sum((1, 2)) / (g**2).sum()
        mean, sem = per_draw.mean().item(), per_draw.std().item() / math.sqrt(draws)
        formula = estimator_relative_variance(16, 4, kind)
        assert abs(mean - formula) < 4 * sem + 0.02 * formula, (kind, mean, formula, sem)
        res[kind] = mean
    assert res["stiefel"] < res["gaussian"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    ref, model = Two(), Two()
    ref.to(dtype)
    model.to(dtype)
    memwrap.wrap(model, rank=4, granularity=2, exclude=())  # low-precision weights: bf16 coords, fp32 for fp16
    x = torch.randn(6, 32).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(6, 24).to(dtype)
    (ref.proj(x1) * dy).sum().backward()
    (model.proj(x2) * dy).sum().backward()
    coords_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    assert x2.grad.dtype == dtype and model.proj.coords.grad.dtype == coords_dtype
    torch.testing.assert_close(x2.grad, x1.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(model.proj.bias.grad, ref.proj.bias.grad, rtol=2e-2, atol=2e-2)


def test_autocast_matches_plain_linear_under_autocast():
    ref, model = exact_and_wrapped()
    x = torch.randn(6, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = ref.proj(x1), model.proj(x2)
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    (y1.float() * dy).sum().backward()
    (y2.float() * dy).sum().backward()
    assert x2.grad.dtype == torch.float32
    torch.testing.assert_close(x2.grad, x1.grad, rtol=2e-2, atol=2e-2)


def test_saved_bytes_are_the_compressed_input():
    """Only x̃ (N × c × r) is saved: c·r/m of the input, measured by saved-tensor hooks."""
    from memwrap.planning.measure import SavedTensorMeter

    _, model = exact_and_wrapped(m=64, n=32, rank=4, granularity=2)
    x = torch.randn(50, 64, requires_grad=True)
    with SavedTensorMeter(model) as meter:
        model.proj(x)
    assert meter.bytes == 50 * 2 * 4 * 4


def test_siblings_share_one_saved_input():
    from memwrap.planning.measure import SavedTensorMeter

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32)

        def forward(self, x):
            return self.q(x).sum() + self.k(x).sum() + self.v(x).sum()

    model = QKV()
    memwrap.wrap(model, rank=4, granularity=2)
    x = torch.randn(50, 64, requires_grad=True)
    with SavedTensorMeter(model) as meter:
        model(x)
    assert meter.bytes == 50 * 2 * 4 * 4  # one x̃ for three layers
    assert len({id(m.group) for m in (model.q, model.k, model.v)}) == 1


def test_eval_forward_saves_nothing_and_is_exact():
    ref, model = exact_and_wrapped()
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.proj(x), ref.proj(x), rtol=0, atol=0)
    assert isinstance(model.proj, CompressedLinear)


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2**-10)  # between two bf16 neighbours 1 and 1 + 2^-7
    g = torch.Generator().manual_seed(0)
    rounded = stochastic_round_bf16(x, g).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    p = 2**-10 / 2**-7  # probability of rounding up
    sem = math.sqrt(p * (1 - p) / x.numel()) * 2**-7
    assert abs(rounded.mean().item() - x[0].item()) < 5 * sem
    assert x.to(torch.bfloat16).float().mean().item() == 1.0  # nearest rounding loses the update entirely


def test_bf16_merge_keeps_small_updates_on_average():
    """Many tiny updates into bf16 weights: stochastic rounding tracks the fp32 sum, nearest rounding stalls."""
    results = {}
    for sr in (True, False):
        model = Two(32, 24, bias=False)
        model.to(torch.bfloat16)
        memwrap.wrap(model, rank=16, granularity=2, exclude=(), stochastic_rounding=sr)
        w0 = model.proj.weight.float().clone()
        for step in range(1, 41):
            model.proj.merge(torch.full_like(model.proj.coords, 1e-4), 1.0, step)
        results[sr] = (model.proj.weight.float() - w0).mean().item()
    assert abs(results[True] - 40e-4) < 0.1 * 40e-4
    assert abs(results[False]) < 0.5 * 40e-4


def test_chunked_merge_is_unbiased_deterministic_and_bounded(monkeypatch):
    """The merge runs a few rows at a time (its transient bounded by MERGE_CHUNK_BYTES); in bf16 each block rounds
    stochastically with its own stream: the mean update over many weights equals the exact one within 5 standard
    errors, and the same seed gives the same weights."""
    from memwrap.compress import base

    monkeypatch.setattr(base, "MERGE_CHUNK_BYTES", 4 * 64 * base.MERGE_BYTES_PER_ELEMENT)  # 4 rows of 64 per block
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Two(64, 96, bias=False).to(torch.bfloat16)
        memwrap.wrap(model, rank=8, granularity=2, exclude=())
        assert base.merge_rows(96, 64) == 4
        w0 = model.proj.weight.float().clone()
        coords = torch.full_like(model.proj.coords, 3e-5)
        exact = model.proj.lifted(coords)  # (96, 64) fp32
        model.proj.merge(coords, 1.0, 1)
        results.append(model.proj.weight.float().clone())
        delta = model.proj.weight.float() - w0
        # per element the rounding error is at most one bf16 ulp of w0, with mean zero
        ulp = (w0.abs().clamp_min(1e-30).log2().floor() - 7).exp2()
        sem = (ulp**2 / 4).sum().sqrt().item() / delta.numel()
        assert abs(delta.mean().item() - exact.mean().item()) < 5 * sem + 1e-9
    assert torch.equal(results[0], results[1])
