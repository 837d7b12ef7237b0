"""ops for the test-time memory: the fast chunk-parallel scan against its token-loop reference."""

import functools
import itertools
import math

import pytest
import torch

from neatlm.ops.features import poly_feature_dim, poly_features, poly_features_reference, poly_init_coeffs
from neatlm.ops.memory import chunk_step, chunk_step_bwd, chunk_step_fwd, memory_forward, memory_scan, memory_scan_reference
from neatlm.ops.memory.chunk import inner_grads
from neatlm.ops.newton_schulz import newton_schulz, newton_schulz_reference

B, H, DK, DV, HID = 2, 2, 5, 4, 6


def _shapes(depth):
    if depth == 1:
        return [(DV, DK)]
    return [(HID, DK)] + [(HID, HID)] * (depth - 2) + [(DV, HID)]


def _inputs(depth, window, dtype, L=11, chunk=4, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    e, n = window - 1, L // chunk
    args = dict(
        weights=[r(B, H, *s) * (2.0 / s[1]) ** 0.5 for s in _shapes(depth)],
        momentum=[r(B, H, *s) * 0.1 for s in _shapes(depth)],
        q=torch.nn.functional.normalize(r(B, H, L, DK), dim=-1),      # the layer l2-normalises q, k
        k=torch.nn.functional.normalize(r(B, H, L + e, DK), dim=-1), v=r(B, H, L + e, DV),
        lr=u(B, H, L) * 0.1, mom=u(B, H, n), keep=0.5 + 0.5 * u(B, H, n),
        gamma=u(B, H, L + e) if window > 1 else None)
    if requires_grad:
        for key, val in args.items():
            if isinstance(val, list):
                for t in val:
                    t.requires_grad_(True)
            elif val is not None:
                val.requires_grad_(True)
    return args


def _call(fn, a, **kw):
    return fn(a["weights"], a["momentum"], a["q"], a["k"], a["v"], a["lr"], a["mom"], a["keep"], a["gamma"], **kw)


def _flat(out):
    y, w, s = out
    return [y, *w, *s]


CASES = [c for c in itertools.product([1, 2, 3], [False, True], [1, 3], ["momentum", "muon"], [0.0, 0.7])
         if not (c[0] == 1 and c[1])]


@pytest.mark.parametrize("depth,norm,window,optimizer,cap", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fast_equals_reference(depth, norm, window, optimizer, cap, dtype, tol):
    a = _inputs(depth, window, dtype)
    kw = dict(chunk_size=4, window=window, norm=norm, optimizer=optimizer, max_grad_norm=cap)
    fast, ref = _flat(_call(memory_scan, a, **kw)), _flat(_call(memory_scan_reference, a, **kw))
    for f, r in zip(fast, ref):
        assert f.shape == r.shape
        assert (f - r).abs().max().item() < tol * max(1.0, r.abs().max().item())
    # the memory really learned something (the test is not vacuous)
    assert (fast[1] - a["weights"][0]).abs().max() > 1e-3


@pytest.mark.parametrize("depth,norm,window,optimizer,cap,fused",
                         [(1, False, 1, "momentum", 0.0, True), (2, False, 1, "momentum", 0.7, True),
                          (2, True, 3, "muon", 0.0, True), (3, False, 2, "momentum", 0.0, True),
                          (2, True, 3, "momentum", 0.7, False)])
def test_outer_gradients_match_reference(depth, norm, window, optimizer, cap, fused):
    """Autograd through the fast form equals autograd through the token loop, for every input."""
    kw = dict(chunk_size=4, window=window, norm=norm, optimizer=optimizer, max_grad_norm=cap)
    _assert_same_input_gradients(functools.partial(memory_scan, fused=fused), kw, _flat,
                                 lambda: _inputs(depth, window, torch.float64, L=10, requires_grad=True))


def _assert_same_input_gradients(fast, kw, used, make_inputs) -> None:
    """The gradient of a random projection of ``used(outputs)`` with respect to every input is
    the same through ``fast`` as through the token loop."""
    grads = []
    for fn in (fast, memory_scan_reference):
        a = make_inputs()
        outs = used(_call(fn, a, **kw))
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
        leaves = [t for val in a.values() if val is not None for t in (val if isinstance(val, list) else [val])]
        grads.append(torch.autograd.grad(loss, leaves))
    for gf, gr in zip(*grads):
        assert (gf - gr).abs().max().item() < 1e-9


@pytest.mark.parametrize("optimizer,cap", [("momentum", 0.7), ("muon", 0.7), ("momentum", 0.0)])
@pytest.mark.parametrize("used", ["reads", "reads+momentum", "reads+weights"])
def test_outer_gradients_when_only_some_outputs_are_used(optimizer, cap, used):
    """Training reads y and drops the returned state (or keeps part of it): the fused backward gets
    no gradient for the unused outputs and must give what the token loop gives."""
    kw = dict(chunk_size=4, window=3, norm=False, optimizer=optimizer, max_grad_norm=cap)

    def outputs(out):
        y, w, s = out
        return [y] + (list(s) if used == "reads+momentum" else []) + (list(w) if used == "reads+weights" else [])

    _assert_same_input_gradients(memory_scan, kw, outputs,
                                 lambda: _inputs(2, 3, torch.float64, L=12, requires_grad=True))


def test_partial_chunk_is_read_only_and_uses_last_weights():
    a = _inputs(2, 1, torch.float64, L=6, chunk=4)
    y, w, _ = _call(memory_scan, a, chunk_size=4)
    # tokens 4, 5 (unfinished chunk) are read with the weights after chunk 0, which are also returned
    assert torch.allclose(y[..., 4:, :], memory_forward(w, a["q"][..., 4:, :]), atol=1e-12)
    # tokens 0..3 are read with the initial weights
    assert torch.allclose(y[..., :4, :], memory_forward(a["weights"], a["q"][..., :4, :]), atol=1e-12)


def test_omega_window_one_with_unit_gamma_is_titans():
    a = _inputs(2, 1, torch.float64)
    t = _flat(_call(memory_scan, a, chunk_size=4))
    a["gamma"] = torch.ones(B, H, 11, dtype=torch.float64)
    o = _flat(_call(memory_scan, a, chunk_size=4, window=1))
    assert all(torch.allclose(x, y, atol=1e-14) for x, y in zip(t, o))


def test_bad_shapes_raise():
    a = _inputs(2, 3, torch.float64)
    a["k"] = a["k"][..., 1:, :]
    with pytest.raises(ValueError):
        _call(memory_scan, a, chunk_size=4, window=3)


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 8, 5), (4, 4)])
def test_newton_schulz_batched_matches_loop_and_orthogonalises(shape):
    g = torch.randn(*shape, dtype=torch.float64)
    fast, ref = newton_schulz(g, 5), newton_schulz_reference(g, 5)
    assert (fast - ref).abs().max() < 1e-12
    sv = torch.linalg.svdvals(fast)
    assert sv.min() > 0.5 and sv.max() < 1.3          # quintic NS: singular values near 1
    assert torch.allclose(newton_schulz(-g, 5), -fast)  # odd
    assert newton_schulz(torch.zeros(2, 3, 4), 5).abs().max() == 0


@pytest.mark.parametrize("shape,steps", [((3, 5, 8), 5), ((2, 2, 8, 5), 3), ((4, 4), 1), ((2, 3, 6), 0)])
def test_newton_schulz_backward_gradchecks_and_equals_the_reference(shape, steps):
    """The hand-written backward of the iterations: float64 gradcheck, and the gradient autograd
    takes through the term-by-term reference (a tall matrix is transposed first)."""
    g = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: newton_schulz(t, steps), (g,))
    weight = torch.randn(shape, dtype=torch.float64)
    fast = torch.autograd.grad((newton_schulz(g, steps) * weight).sum(), g)[0]
    ref = torch.autograd.grad((newton_schulz_reference(g, steps) * weight).sum(), g)[0]
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("degree", [2, 3])
def test_poly_features(degree):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    coeffs = poly_init_coeffs(degree).double()
    fast, ref = poly_features(x, coeffs), poly_features_reference(x, coeffs)
    assert fast.shape[-1] == poly_feature_dim(5, degree) == sum(math.comb(5 + i - 1, i) for i in range(1, degree + 1))
    assert (fast - ref).abs().max() < 1e-14
    assert torch.allclose(coeffs, torch.tensor([1 / math.factorial(i) for i in range(1, degree + 1)]).double())
    # feature 5 + 0 is a_2 * x_0 * x_0 (first degree-2 monomial)
    assert torch.allclose(fast[..., 5], 0.5 * x[..., 0] ** 2)


@pytest.mark.parametrize("degree", [2, 3])
def test_poly_features_gradients_equal_the_reference(degree):
    """The selection-GEMM path differentiates like the monomial-by-monomial reference, in x and in
    the coefficients, on a non-contiguous input (the memory's heads are a transposed view)."""
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64).transpose(1, 2).requires_grad_()
    coeffs = (poly_init_coeffs(degree).double() + torch.rand(degree, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(poly_features, (x, coeffs))
    weight = torch.randn(poly_feature_dim(4, degree), dtype=torch.float64)
    fast = torch.autograd.grad((poly_features(x, coeffs) * weight).sum(), (x, coeffs))
    ref = torch.autograd.grad((poly_features_reference(x, coeffs) * weight).sum(), (x, coeffs))
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("depth,norm,window,cap", [(1, False, 1, 0.0), (2, True, 3, 0.7), (3, False, 2, 0.0)])
def test_unfused_momentum_equals_reference(depth, norm, window, cap):
    """fused=False (the same chunk step from tensor ops, backward by autograd) keeps the semantics."""
    a = _inputs(depth, window, torch.float64)
    kw = dict(chunk_size=4, window=window, norm=norm, max_grad_norm=cap)
    fast, ref = _flat(_call(memory_scan, a, fused=False, **kw)), _flat(_call(memory_scan_reference, a, **kw))
    for f, r in zip(fast, ref):
        assert (f - r).abs().max().item() < 1e-10 * max(1.0, r.abs().max().item())


def _chunk_args(depth, seed=4):
    g = torch.Generator().manual_seed(seed)
    n_k, n_q, b, h = 5, 3, 2, 1
    ws = [torch.randn(b, h, *s, generator=g, dtype=torch.float64) * (2.0 / s[1]) ** 0.5 for s in _shapes(depth)]
    ss = [torch.randn(b, h, *s, generator=g, dtype=torch.float64) * 0.1 for s in _shapes(depth)]
    x = torch.nn.functional.normalize(torch.randn(b, h, n_k + n_q, DK, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(b, h, n_k, DV, generator=g, dtype=torch.float64)
    c = -torch.rand(b, h, n_k, generator=g, dtype=torch.float64)
    eta = torch.rand(b, h, 1, 1, generator=g, dtype=torch.float64)
    keep = torch.rand(b, h, 1, 1, generator=g, dtype=torch.float64)
    return n_k, [t.requires_grad_(True) for t in [x, v, c, eta, keep, *ws, *ss]], g


def _unfused(depth, n_k, norm, cap):
    """The fused step's maths in plain autograd: inner gradients, then S' = eta S + U, W' = keep W + S'."""
    def step(x, v, c, eta, keep, *wss):
        y, us = inner_grads(list(wss[:depth]), x, n_k, v, c, norm, cap)
        s_new = [eta * s + u for s, u in zip(wss[depth:], us)]
        return (y, *[keep * w + s for w, s in zip(wss[:depth], s_new)], *s_new)
    return step


CHUNK_CASES = [(1, False, 0.0), (2, False, 0.0), (2, True, 0.6), (3, True, 0.0), (3, False, 0.6)]


@pytest.mark.parametrize("depth,norm,cap", CHUNK_CASES)
def test_fused_chunk_step_backward(depth, norm, cap):
    """The hand-written backward: float64 gradcheck, and equality with autograd through the unfused maths."""
    n_k, args, g = _chunk_args(depth)

    def fused(x, v, c, eta, keep, *wss):
        y, w, s = chunk_step(list(wss[:depth]), list(wss[depth:]), x, n_k, v, c, eta, keep, norm, cap)
        return (y, *w, *s)

    assert torch.autograd.gradcheck(fused, args, eps=1e-6, atol=1e-7, rtol=1e-5)
    outs_f, outs_u = fused(*args), _unfused(depth, n_k, norm, cap)(*args)
    for a, b in zip(outs_f, outs_u):
        assert (a - b).abs().max() < 1e-12
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs_f]
    gf = torch.autograd.grad(outs_f, args, cot)
    gu = torch.autograd.grad(outs_u, args, cot)
    for a, b in zip(gf, gu):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("depth,norm,cap", CHUNK_CASES)
def test_chunk_step_fwd_bwd_called_directly(depth, norm, cap):
    """chunk_step_fwd / chunk_step_bwd as plain functions (no autograd Function around them): the
    returned gradients, unpacked by name, equal autograd's through the unfused maths."""
    n_k, args, g = _chunk_args(depth, seed=5)
    x, v, c, eta, keep, *wss = [t.detach() for t in args]
    ws, ss = wss[:depth], wss[depth:]
    y, w_new, s_new, saved = chunk_step_fwd(ws, ss, x, n_k, v, c, eta, keep, norm, cap)
    outs_u = _unfused(depth, n_k, norm, cap)(*args)
    for a, b in zip([y, *w_new, *s_new], outs_u):
        assert (a - b).abs().max() < 1e-12
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs_u]
    got = chunk_step_bwd(saved, cot[0], cot[1:1 + depth], cot[1 + depth:], n_k, norm, cap)
    want = torch.autograd.grad(outs_u, args, cot)
    named = [got.x, got.v, got.coef, got.eta, got.keep, *got.weights, *got.momentum]
    for a, b in zip(named, want):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-10
