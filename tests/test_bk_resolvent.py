"""BK-Core op: values against torch.linalg.inv, the exact O(N) gradient, identities, causality.

Inputs are fresh random draws every run (the seed is in every failure message). Couplings have
b_k c_k > 0 and Im z >= 0.1, the regime in which the ratio form is provably stable.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.autograd import gradcheck

from neatlm.ops.bk_resolvent import (bk_resolvent_diag, bk_resolvent_diag_reference, linear_scan, linear_scan_loop,
                                     ratio_scan, ratio_scan_loop)

F64, C128 = torch.float64, torch.complex128


@pytest.fixture
def gen():
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed)     # failure messages print g.initial_seed()


def draw(g, batch, n, symmetric=False, requires_grad=False):
    v = torch.randn(*batch, n, generator=g, dtype=F64) * 2
    b = torch.rand(*batch, n - 1, generator=g, dtype=F64) + 0.2
    sign = torch.where(torch.rand(*batch, n - 1, generator=g) < 0.5, -1.0, 1.0).to(F64)
    b = b * sign
    c = b.clone() if symmetric else (torch.rand(*batch, n - 1, generator=g, dtype=F64) + 0.2) * sign
    zr = torch.randn(batch, generator=g, dtype=F64)
    zi = torch.rand(batch, generator=g, dtype=F64) + 0.1
    z = torch.complex(zr, zi)
    if requires_grad:
        return [t.requires_grad_() for t in (v, b, c, z)]
    return v, b, c, z


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 256])
def test_matches_inverse(gen, n):
    v, b, c, z = draw(gen, (3,), n)
    G = bk_resolvent_diag(v, b, c, z)
    ref = bk_resolvent_diag_reference(v, b, c, z, method="inv")
    assert G.dtype == C128 and G.shape == (3, n)
    err = ((G - ref).abs() / ref.abs()).max().item()
    assert err < 1e-10, f"seed {gen.initial_seed()}: elementwise rel err {err:.2e}"


@pytest.mark.parametrize("n", [1, 2, 5, 40])
def test_causal_matches_leading_block_inverse(gen, n):
    v, b, c, z = draw(gen, (2,), n)
    G = bk_resolvent_diag(v, b, c, z, causal=True)
    ref = bk_resolvent_diag_reference(v, b, c, z, causal=True, method="inv")
    err = ((G - ref).abs() / ref.abs()).max().item()
    assert err < 1e-10, f"seed {gen.initial_seed()}: {err:.2e}"


def test_causal_n256_sampled_blocks(gen):
    n = 256
    v, b, c, z = draw(gen, (2,), n)
    G = bk_resolvent_diag(v, b, c, z, causal=True)
    A = (torch.diag_embed(v.to(C128) - z[:, None]) + torch.diag_embed(b.to(C128), 1)
         + torch.diag_embed(c.to(C128), -1))
    for k in [0, 1, 100, 177, 255]:
        # one matrix at a time: batched complex LU of these matrices hit a oneMKL bug (see _inv_each)
        ref = torch.stack([torch.linalg.inv(m[: k + 1, : k + 1])[k, k] for m in A])
        err = ((G[:, k] - ref).abs() / ref.abs()).max().item()
        assert err < 1e-10, f"seed {gen.initial_seed()}, k {k}: {err:.2e}"


def test_causal_is_noncausal_of_prefix(gen):
    v, b, c, z = draw(gen, (2,), 30)
    G = bk_resolvent_diag(v, b, c, z, causal=True)
    for k in [0, 9, 29]:
        full = bk_resolvent_diag(v[:, : k + 1], b[:, :k], c[:, :k], z)
        assert rel(G[:, k], full[:, k]) < 1e-12


def test_long_chain_is_stable(gen):
    # the continuant form overflows here; the ratio form and the recursion must not
    n = 4096
    v, b, c, _ = draw(gen, (2,), n, symmetric=True)
    z = torch.tensor(0.3 + 0.01j, dtype=C128)
    for causal in (False, True):
        G = bk_resolvent_diag(v, b, c, z, causal=causal)
        ref = bk_resolvent_diag_reference(v, b, c, z, causal=causal, method="loop")
        assert torch.isfinite(torch.view_as_real(G)).all()
        err = ((G - ref).abs() / ref.abs()).max().item()
        assert err < 1e-9, f"seed {gen.initial_seed()}, causal {causal}: {err:.2e}"


def test_broadcasting(gen):
    n = 12
    v = torch.randn(4, 3, n, generator=gen, dtype=F64)
    b = torch.rand(3, n - 1, generator=gen, dtype=F64) + 0.3           # shared over the leading dim
    z = torch.complex(torch.randn(3, generator=gen, dtype=F64), torch.rand(3, generator=gen, dtype=F64) + 0.2)
    G = bk_resolvent_diag(v, b, b, z)
    ref = bk_resolvent_diag_reference(v, b.expand(4, 3, n - 1), b.expand(4, 3, n - 1), z.expand(4, 3))
    assert G.shape == (4, 3, n) and rel(G, ref) < 1e-12
    G0 = bk_resolvent_diag(v, b, b, complex(z[0]))                   # a Python complex works too
    assert rel(G0[:, 0], ref[:, 0]) < 1e-12


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 33, 100])
def test_scans_match_loops(gen, n):
    alpha = torch.complex(torch.randn(2, n, generator=gen, dtype=F64), -torch.rand(2, n, generator=gen, dtype=F64) - .1)
    beta = (torch.rand(2, n - 1, generator=gen, dtype=F64) + 0.1).to(C128)
    assert rel(ratio_scan(alpha, beta), ratio_scan_loop(alpha, beta)) < 1e-12
    a = torch.randn(2, n, generator=gen, dtype=C128)
    u = torch.randn(2, n, generator=gen, dtype=C128)
    assert rel(linear_scan(a, u), linear_scan_loop(a, u)) < 1e-12


# ----------------------------------------------------------------------------- identities

def test_trace_identity(gen):
    n = 50
    v, b, _, z = draw(gen, (2,), n, symmetric=True)
    G = bk_resolvent_diag(v, b, b, z)
    H = torch.diag_embed(v) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
    lam = torch.linalg.eigvalsh(H).to(C128)
    rhs = (1 / (lam - z[:, None])).sum(-1)
    assert rel(G.sum(-1), rhs) < 1e-10, f"seed {gen.initial_seed()}"


def test_ward_identity_and_positive_imaginary_part(gen):
    n = 40
    v, b, _, z = draw(gen, (3,), n, symmetric=True)
    for causal in (False, True):
        G = bk_resolvent_diag(v, b, b, z, causal=causal)
        assert (G.imag > 0).all(), f"seed {gen.initial_seed()}"
    G = bk_resolvent_diag(v, b, b, z)
    A = torch.diag_embed(v.to(C128) - z[:, None]) + torch.diag_embed(b.to(C128), 1) + torch.diag_embed(b.to(C128), -1)
    full = torch.stack([torch.linalg.inv(m) for m in A])
    ward = (full.abs() ** 2).sum(-1)                     # sum_j |G_ij|^2
    assert rel(G.imag / z.imag[:, None], ward) < 1e-10, f"seed {gen.initial_seed()}"


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("causal", [False, True])
def test_gradient_matches_autograd_through_inverse(gen, causal):
    n = 64 if not causal else 24
    v, b, c, z = draw(gen, (2,), n, requires_grad=True)
    wr = torch.randn(2, n, generator=gen, dtype=F64)
    wi = torch.randn(2, n, generator=gen, dtype=F64)
    ours = bk_resolvent_diag(v, b, c, z, causal=causal)
    ref = bk_resolvent_diag_reference(v, b, c, z, causal=causal, method="inv")
    g1 = torch.autograd.grad((ours.real * wr + ours.imag * wi).sum(), (v, b, c, z))
    g2 = torch.autograd.grad((ref.real * wr + ref.imag * wi).sum(), (v, b, c, z))
    for name, a, r in zip("vbcz", g1, g2):
        err = ((a - r).norm() / r.norm()).item()
        assert err < 1e-10, f"seed {gen.initial_seed()}: d/d{name} rel err {err:.2e}"


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(gen, causal):
    # fresh inputs; general signs for v, b, c; z per batch element (complex gradcheck)
    inputs = draw(gen, (2,), 7, requires_grad=True)
    assert gradcheck(lambda v, b, c, z: bk_resolvent_diag(v, b, c, z, causal=causal), inputs)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_broadcast_shapes(gen, causal):
    v = torch.randn(3, 6, generator=gen, dtype=F64, requires_grad=True)
    b = (torch.rand(5, generator=gen, dtype=F64) + 0.3).requires_grad_()       # shared by the batch
    c = (torch.rand(3, 5, generator=gen, dtype=F64) + 0.3).requires_grad_()
    z = torch.tensor(0.4 + 0.6j, dtype=C128, requires_grad=True)                 # one scalar z
    assert gradcheck(lambda v, b, c, z: bk_resolvent_diag(v, b, c, z, causal=causal), (v, b, c, z))


def test_carried_state_continues_exactly_and_gradchecks(gen):
    n, a = 11, 4
    v, b, c, z = draw(gen, (2,), n)
    G = bk_resolvent_diag(v, b, c, z, causal=True)
    d_prev, beta_prev = 1 / G[:, a - 1], b[:, a - 1] * c[:, a - 1]
    tail = bk_resolvent_diag(v[:, a:], b[:, a:], c[:, a:], z, causal=True, init=(d_prev, beta_prev))
    assert rel(tail, G[:, a:]) < 1e-13
    inputs = [t.detach().clone().requires_grad_() for t in (v[:, a:], b[:, a:], c[:, a:], z, d_prev, beta_prev)]
    assert gradcheck(lambda v, b, c, z, d, be: bk_resolvent_diag(v, b, c, z, causal=True, init=(d, be)), inputs)


def test_gradient_on_the_real_line_limit_is_finite(gen):
    # small Im z: values and gradients stay finite and still match the loop reference
    v, b, c, _ = draw(gen, (2,), 200, requires_grad=True)
    z = torch.tensor(0.1 + 1e-3j, dtype=C128)
    G = bk_resolvent_diag(v, b, c, z)
    R = bk_resolvent_diag_reference(v, b, c, z, method="loop")
    g1 = torch.autograd.grad(G.real.sum(), (v, b, c))
    g2 = torch.autograd.grad(R.real.sum(), (v, b, c))
    for a, r in zip(g1, g2):
        assert torch.isfinite(a).all() and ((a - r).norm() / r.norm()).item() < 1e-8


def test_grad_blend_is_an_ablation_on_v_only(gen):
    v, b, c, z = draw(gen, (2,), 20, requires_grad=True)
    wr = torch.randn(2, 20, generator=gen, dtype=F64)
    wi = torch.randn(2, 20, generator=gen, dtype=F64)

    def grads(**kw):
        G = bk_resolvent_diag(v, b, c, z, **kw)
        return G.detach(), torch.autograd.grad((G.real * wr + G.imag * wi).sum(), (v, b, c, z))

    G, exact = grads()
    _, zero = grads(grad_blend=0.0)
    _, half = grads(grad_blend=0.5)
    for a, e in zip(zero, exact):
        assert torch.equal(a, e)
    w = torch.complex(wr, -wi)                           # conj of PyTorch's grad_G = wr + i wi
    diag_only = -(w / G**2).real                         # the original project's diagonal-only term
    assert torch.allclose(half[0], 0.5 * exact[0] + 0.5 * diag_only, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(diag_only, exact[0], rtol=1e-3)     # it is not the gradient
    for a, e in zip(half[1:], exact[1:]):
        assert torch.equal(a, e)


@pytest.mark.parametrize("precision,tol", [("complex64", 1e-4), ("mixed", 1e-4)])
def test_lower_precisions(gen, precision, tol):
    v, b, c, z = draw(gen, (2,), 64, symmetric=True, requires_grad=True)
    for causal in (False, True):
        G = bk_resolvent_diag(v, b, c, z, causal=causal, precision=precision)
        ref = bk_resolvent_diag(v, b, c, z, causal=causal)
        assert G.dtype == (torch.complex64 if precision == "complex64" else C128)
        assert rel(G.to(C128), ref) < tol
        g = torch.autograd.grad(G.real.sum() + G.imag.sum(), (v, b, c, z))
        gr = torch.autograd.grad(ref.real.sum() + ref.imag.sum(), (v, b, c, z))
        for a, r in zip(g, gr):
            assert a.dtype == r.dtype
            assert ((a - r).norm() / r.norm()).item() < 1e-3, f"seed {gen.initial_seed()}"


def test_float32_inputs_get_float32_gradients(gen):
    v, b, c, z = draw(gen, (2,), 16)
    v, b, c = (t.float().requires_grad_() for t in (v, b, c))
    G = bk_resolvent_diag(v, b, c, z.to(torch.complex64))
    G.real.sum().backward()
    assert v.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- causality

def test_causal_variant_is_causal_and_full_variant_is_not(gen):
    n, t = 32, 13
    v, b, c, z = draw(gen, (2,), n)
    v2, b2, c2 = v.clone(), b.clone(), c.clone()
    v2[:, t] += 1.0
    b2[:, t] += 0.5      # couples t and t+1
    c2[:, t] += 0.5
    G = bk_resolvent_diag(v, b, c, z, causal=True)
    G2 = bk_resolvent_diag(v2, b2, c2, z, causal=True)
    assert torch.equal(G[:, :t], G2[:, :t])
    assert (G[:, t] != G2[:, t]).all()
    F1, F2 = bk_resolvent_diag(v, b, c, z), bk_resolvent_diag(v2, b2, c2, z)
    assert ((F1[:, :t] - F2[:, :t]).abs() > 1e-12).any()     # the full resolvent sees the future


def test_bad_arguments():
    v = torch.randn(2, 5, dtype=F64)
    with pytest.raises(ValueError, match="N-1"):
        bk_resolvent_diag(v, torch.ones(2, 5, dtype=F64), torch.ones(2, 4, dtype=F64), 1j)
    with pytest.raises(ValueError, match="precision"):
        bk_resolvent_diag(v, torch.ones(2, 4, dtype=F64), torch.ones(2, 4, dtype=F64), 1j, precision="fp8")
    with pytest.raises(ValueError, match="causal"):
        bk_resolvent_diag(v, torch.ones(2, 4, dtype=F64), torch.ones(2, 4, dtype=F64), 1j,
                          init=(torch.ones(2, dtype=C128), torch.ones(2, dtype=F64)))
