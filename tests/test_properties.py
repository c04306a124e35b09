"""Property-based (hypothesis): for drawn wrap settings and small model shapes, wrap → unwrap is bit-exact, the
forward output is unchanged, input gradients are exact (to float32 rounding of the same product in another order),
and coords.grad is the weight gradient projected by P."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memwrap

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


class Net(nn.Module):
    """Two linears (the second reads the first's activation) and a bias-free third beside them."""

    def __init__(self, m: int, h: int, n: int, bias: bool):
        super().__init__()
        self.up = nn.Linear(m, h, bias=bias)
        self.down = nn.Linear(h, n, bias=bias)
        self.side = nn.Linear(m, n, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + self.side(x)


@st.composite
def setups(draw):
    m = draw(st.sampled_from([4, 8, 12, 16, 24, 32]))
    h = draw(st.sampled_from([4, 8, 16, 32]))
    n = draw(st.integers(1, 20))
    common = [c for c in range(1, min(m, h) + 1) if m % c == 0 and h % c == 0]
    c = draw(st.sampled_from(common))
    r = draw(st.integers(1, min(m, h) // c))
    settings = dict(rank=r, granularity=c, projection=draw(st.sampled_from(["stiefel", "gaussian", "rademacher"])),
                    seed=draw(st.integers(0, 2**31 - 1)), share_inputs=draw(st.booleans()),
                    refresh_every=draw(st.integers(1, 50)))
    shape = draw(st.sampled_from([(3,), (2, 5), (1, 2, 3)]))
    return m, h, n, draw(st.booleans()), settings, shape, draw(st.integers(0, 2**31 - 1))


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(setups())
def test_wrap_is_exact_and_unwrap_restores_bit_for_bit(setup):
    m, h, n, bias, settings, shape, data_seed = setup
    torch.manual_seed(data_seed)
    ref = Net(m, h, n, bias)
    model = copy.deepcopy(ref)
    types = [(name, type(mod)) for name, mod in model.named_modules()]
    memwrap.wrap(model, exclude=(), **settings)
    assert all(isinstance(mod, memwrap.compress.linear.CompressedLinear) for mod in (model.up, model.down, model.side))

    x = torch.randn(*shape, m)
    dy = torch.randn(*shape, n)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), model(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)  # forward unchanged
    (y1 * dy).sum().backward()
    (y2 * dy).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)  # exact input gradient
    for name in ("up", "down", "side"):
        layer, plain = getattr(model, name), getattr(ref, name)
        p = layer.group.projection()
        g = plain.weight.grad
        expected = g.reshape(g.shape[0], layer.c, -1) @ p
        torch.testing.assert_close(layer.coords.grad, expected, rtol=1e-4, atol=1e-5)
        assert layer.weight.grad is None
        if layer.bias is not None:
            torch.testing.assert_close(layer.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-6)

    memwrap.unwrap(model)
    assert [(name, type(mod)) for name, mod in model.named_modules()] == types
    state, ref_state = model.state_dict(), ref.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
