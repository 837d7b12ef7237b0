"""BKMixer: the mixer protocol, causality, exact state carry, gradients of every parameter."""

from __future__ import annotations

import random

import pytest
import torch
from torch.autograd import gradcheck

from neatlm.config import BKConfig, Config, validate
from neatlm.nn import BKMixer


def make(dim=24, causal=True, heads=3, **kw):
    """A float64 mixer with random (not tiny) weights so every path is exercised."""
    m = BKMixer(dim, causal=causal, heads=heads, **kw).double()
    with torch.no_grad():
        for lin in (m.to_potential, m.to_hopping, m.out_proj):
            lin.weight.normal_(0, 0.4)
            lin.bias.normal_(0, 0.2)
        m.h0.normal_(0, 0.5)
    return m


@pytest.fixture
def seed():
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


def test_shapes_dtype_and_protocol(seed):
    m = BKMixer(32)                     # float32, default heads = dim // 16
    x = torch.randn(2, 9, 32)
    y, state = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert m.heads == 2 and state.pos == 9
    assert state.d.shape == (2, 2) and state.beta.shape == (2, 2)
    z = m.spectral_z()
    assert (z.imag >= m.min_imag).all()


def test_from_config():
    cfg = BKConfig(causal=True, heads=5, v_max=2.0, min_imag=0.2, precision="mixed", grad_blend=0.25)
    m = BKMixer.from_config(40, cfg)
    assert (m.heads, m.v_max, m.min_imag, m.precision, m.grad_blend, m.causal) == (5, 2.0, 0.2, "mixed", 0.25, True)
    y, _ = m(torch.randn(1, 4, 40))
    assert y.shape == (1, 4, 40)


def test_causal_mixer_does_not_see_the_future(seed):
    m = make()
    x = torch.randn(2, 20, 24, dtype=torch.float64)
    t = random.randrange(1, 19)
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 24, dtype=torch.float64)
    y, _ = m(x)
    y2, _ = m(x2)
    assert torch.equal(y[:, :t], y2[:, :t]), f"seed {seed}, t {t}"
    assert (y[:, t] - y2[:, t]).abs().max() > 1e-6


def test_noncausal_mixer_sees_the_future_and_refuses_a_state(seed):
    m = make(causal=False)
    x = torch.randn(2, 16, 24, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 10] += 1.0
    y, state = m(x)
    y2, _ = m(x2)
    assert state is None
    assert (y[:, :10] - y2[:, :10]).abs().max() > 1e-8
    with pytest.raises(ValueError, match="state=None"):
        m(x, _causal_state(x))


def _causal_state(x):
    _, s = make()(x)
    return s


@pytest.mark.parametrize("precision", ["complex128", "mixed"])
def test_split_anywhere_equals_whole_run(seed, precision):
    m = make(precision=precision)
    T = 10
    x = torch.randn(2, T, 24, dtype=torch.float64)
    y, s = m(x)
    for a in range(1, T):
        y1, s1 = m(x[:, :a])
        y2, s2 = m(x[:, a:], s1)
        assert torch.allclose(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-12), f"seed {seed}, split {a}"
        assert s2.pos == T and torch.allclose(s2.d, s.d, rtol=1e-12, atol=0)
    # three uneven pieces and one token at a time (decoding)
    outs, st = [], None
    for lo, hi in [(0, 3), (3, 4), (4, T)]:
        o, st = m(x[:, lo:hi], st)
        outs.append(o)
    assert torch.allclose(torch.cat(outs, 1), y, rtol=0, atol=1e-12)
    outs, st = [], None
    for t in range(T):
        o, st = m(x[:, t:t + 1], st)
        outs.append(o)
    assert torch.allclose(torch.cat(outs, 1), y, rtol=0, atol=1e-12)


def test_carried_state_passes_gradients_to_the_earlier_chunk(seed):
    m = make()
    x = torch.randn(1, 10, 24, dtype=torch.float64, requires_grad=True)
    y1, s1 = m(x[:, :6])
    y2, _ = m(x[:, 6:], s1)
    g_split = torch.autograd.grad(y2.sum(), x)[0]
    y, _ = m(x)
    g_whole = torch.autograd.grad(y[:, 6:].sum(), x)[0]
    assert torch.allclose(g_split, g_whole, rtol=1e-10, atol=1e-12)
    assert g_split[:, :6].abs().sum() > 0


@pytest.mark.parametrize("causal", [True, False])
def test_every_parameter_gets_a_gradient(seed, causal):
    m = make(causal=causal)
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    y, _ = m(x)
    (y.square().mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_mixer(seed, causal):
    m = make(dim=6, heads=2, causal=causal)
    x = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):   # functional in the parameters, so gradcheck covers their gradients too
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))[0]

    inputs = (x, *[p.detach().clone().requires_grad_() for p in m.parameters()])
    assert gradcheck(f, inputs)


def test_model_with_bk_mixer_and_moe_carries_state():
    from neatlm.nn.model import NeatLM

    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 2
    cfg.model.mixer, cfg.model.mlp = "bk", "moe"
    validate(cfg)
    torch.manual_seed(0)
    model = NeatLM(cfg)
    idx = torch.randint(0, 256, (2, 12))
    logits, _, _, _ = model(idx)
    l1, s1, _, _ = model(idx[:, :5])
    l2, _, _, _ = model(idx[:, 5:], s1)
    assert torch.allclose(torch.cat([l1, l2], 1), logits, atol=1e-5)
