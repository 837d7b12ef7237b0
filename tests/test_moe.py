"""Sparse MoE: dispatch equals the dense masked reference, gradients, capacity, load balance."""

from __future__ import annotations

import random

import pytest
import torch
from torch.autograd import gradcheck

import neatlm.ops.moe_dispatch as md
from neatlm.config import MoEConfig
from neatlm.nn import MoE
from neatlm.ops.moe_dispatch import capacity_for, experts_swiglu, load_balance_loss, make_dispatch, route_topk

F64 = torch.float64


@pytest.fixture
def seed():
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


def make(dim=8, hidden=12, experts=4, top_k=2, capacity_factor=0.0):
    return MoE(dim, hidden, experts=experts, top_k=top_k, capacity_factor=capacity_factor, init_std=0.3).double()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_sparse_equals_dense_masked_reference(seed, top_k, capacity_factor):
    m = make(top_k=top_k, capacity_factor=capacity_factor)
    x = torch.randn(3, 10, 8, dtype=F64, requires_grad=True)
    y, _ = m(x)
    ref = m.dense_reference(x)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-13), f"seed {seed}"
    if capacity_factor:
        assert m.run(x).dropped > 0
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    gs = torch.autograd.grad((y * g).sum(), params, allow_unused=True)
    gr = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for (name, _), a, b in zip([("x", x), *m.named_parameters()], gs, gr):
        if b is None:
            assert a is None or a.abs().sum() == 0, name
        else:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), f"seed {seed}: {name}"


def test_gradcheck_experts(seed):
    n, d, h, e = 14, 5, 6, 3
    x = torch.randn(n, d, dtype=F64, requires_grad=True)
    _, experts, gates = route_topk(torch.randn(n, e, dtype=F64), 2)
    disp = make_dispatch(experts, e, capacity_for(n, 2, e, 0.8))
    g = gates.reshape(-1)[disp.assignment].detach().requires_grad_()
    ws = [(torch.randn(*s, dtype=F64) * 0.5).requires_grad_() for s in ((e, d, h), (e, d, h), (e, h, d))]
    assert gradcheck(lambda x, g, a, b, c: experts_swiglu(x, g, disp, a, b, c), (x, g, *ws))


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradcheck_whole_layer(seed, top_k):
    m = make(dim=4, hidden=5, experts=3, top_k=top_k)
    # redraw until no two router logits are within 1e-3 (finite differences must not flip the top-k)
    for _ in range(100):
        x = torch.randn(1, 6, 4, dtype=F64)
        top = (x.reshape(-1, 4) @ m.router.weight.T).sort(-1, descending=True).values
        if (top[:, :-1] - top[:, 1:]).min() > 1e-3:
            break
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    inputs = (x.requires_grad_(), *[p.detach().clone().requires_grad_() for p in m.parameters()])
    assert gradcheck(f, inputs, fast_mode=True)


def test_never_runs_every_expert_on_every_token(seed, monkeypatch):
    rows = []
    real = md._swiglu

    def counting(xs, *w):
        rows.append(xs.shape[0])
        return real(xs, *w)

    monkeypatch.setattr(md, "_swiglu", counting)
    n_tok, experts, k = 2 * 32, 8, 2
    m = MoE(16, 24, experts=experts, top_k=k)
    m(torch.randn(2, 32, 16))
    assert sum(rows) == n_tok * k < n_tok * experts
    assert len(rows) <= experts


def test_capacity_drops_overflow_and_dropped_tokens_pass_zero(seed):
    m = make(experts=4, top_k=1, capacity_factor=0.25)   # capacity = ceil(0.25 * N / 4)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 1.0                        # route everything to expert 0
    x = torch.randn(1, 16, 8, dtype=F64)
    x[..., 0] = x[..., 0].abs() + 1.0
    y, _ = m(x)
    cap = capacity_for(16, 1, 4, 0.25)
    assert cap == 1 and m.run(x).dropped == 15
    assert y[0, 0].abs().sum() > 0
    assert torch.equal(y[0, 1:], torch.zeros_like(y[0, 1:]))


def test_load_balance_loss(seed):
    n, e = 40, 5
    logits = torch.randn(n, e, dtype=F64, requires_grad=True)
    probs, experts, _ = route_topk(logits, 2)
    disp = make_dispatch(experts, e)
    loss = load_balance_loss(probs, disp.load)
    f = torch.bincount(experts.reshape(-1), minlength=e).to(F64) / (2 * n)
    assert torch.allclose(loss, e * (f * probs.mean(0)).sum())
    (g,) = torch.autograd.grad(loss, logits)
    assert g.abs().sum() > 0                                     # in the graph
    # a perfectly uniform router scores 1
    uni = torch.full((n, e), 1.0 / e, dtype=F64)
    assert torch.allclose(load_balance_loss(uni, torch.full((e,), 1.0 / e)), torch.tensor(1.0, dtype=F64))


def test_every_parameter_gets_a_gradient_and_aux_loss_is_weighted(seed):
    m = MoE(16, 24, experts=4, top_k=2, aux_loss_weight=0.1)
    x = torch.randn(4, 32, 16)
    y, aux_loss = m(x)
    assert torch.allclose(aux_loss, 0.1 * m.run(x).balance_loss)
    (y.square().mean() + aux_loss).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_top1_router_learns_from_the_main_loss(seed):
    m = MoE(8, 12, experts=4, top_k=1, aux_loss_weight=0.0)
    y, _ = m(torch.randn(2, 16, 8))
    y.square().sum().backward()
    assert m.router.weight.grad.abs().sum() > 0


def test_from_config():
    cfg = MoEConfig(experts=6, top_k=1, capacity_factor=1.5, aux_loss_weight=0.02)
    m = MoE.from_config(16, 32, cfg)
    assert (m.experts, m.top_k, m.capacity_factor, m.aux_loss_weight) == (6, 1, 1.5, 0.02)
    assert m.w_gate.shape == (6, 16, 32) and m.w_down.shape == (6, 32, 16)
    assert m(torch.randn(2, 5, 16))[0].shape == (2, 5, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 8, experts=2, top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 8, experts=2, top_k=0)
