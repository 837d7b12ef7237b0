"""BK-Core: the diagonal of the resolvent of a tridiagonal matrix, with its exact O(N) gradient.

For a tridiagonal ``H`` (diagonal ``v``, super-diagonal ``b``, sub-diagonal ``c``) and a complex
spectral parameter ``z`` (``Im z > 0``), :func:`bk_resolvent_diag` returns
``G_kk = [(H - z I)^-1]_kk`` for every ``k``. A fixed on-site potential ``h0`` is folded into
``v`` by the caller (``v = h0 + v``): the op only sees the full diagonal.

Notation (0-based, positions ``0..N-1``): ``alpha_k = v_k - z``, ``beta_k = b_k c_k`` couples
``k`` and ``k+1``. Ratio form (stable; the continuant form overflows for long N):

    d_0 = alpha_0,        d_k = alpha_k - beta_{k-1} / d_{k-1}      (forward scan)
    e_{N-1} = alpha_{N-1}, e_k = alpha_k - beta_k / e_{k+1}           (backward scan)
    G_kk = 1 / (d_k + e_k - alpha_k)

Exact gradient (derived in ``docs/bk_core.md``). With ``w = conj(grad_G)`` (PyTorch passes
``dL/dRe G + i dL/dIm G``), ``u_k = w_k G_kk^2``, ``rho_k = beta_k / e_{k+1}^2``,
``sigma_k = beta_k / d_k^2``:

    F_0 = u_0,          F_j = rho_{j-1} F_{j-1} + u_j                 (forward linear scan)
    T_{N-1} = u_{N-1},  T_j = u_j + sigma_j T_{j+1}                   (backward linear scan)
    S_j = F_j + T_j - u_j = sum_i w_i G_ij G_ji
    dL/dv_j = -Re S_j,  dL/dz = conj(sum_j S_j),
    dL/dbeta_k = Re(F_k / e_{k+1} + T_{k+1} / d_k),  dL/db_k = c_k dL/dbeta_k,  dL/dc_k = b_k dL/dbeta_k

Causal variant (``causal=True``): ``G_kk = [(H_{0..k} - z)^-1]_kk = 1 / d_k``, the resolvent of
the leading principal submatrix; it depends on ``v_0..v_k`` and ``beta_0..beta_{k-1}`` only. Its
gradient is the same backward scan ``T`` (with ``G = 1/d``):

    dL/dv_j = -Re T_j,  dL/dz = conj(sum_j T_j),  dL/dbeta_k = Re(T_{k+1} / d_k).

A causal call may continue a previous one: ``init=(d_prev, beta_prev)`` puts a virtual position
before position 0 whose forward-scan value is ``d_prev`` and whose coupling to position 0 is
``beta_prev``; gradients flow into both.

Speed: both scans are chains of 2x2 maps (Moebius maps for ``d``/``e``, affine maps for ``F``/
``T``), run here by odd-even recursion: compose neighbouring pairs, solve the half-length problem,
then fill in the even positions with one step of the plain recurrence. That is O(N) work in
O(log N) vectorised steps, and the filled-in positions use the stable ratio form itself. The
forward and backward scans of one call run stacked in a single recursion, so Python overhead is
paid once per level, not once per position. ``benchmarks/bk_core.py`` compares it with a plain
loop, a blocked (sqrt N) scan and a Hillis-Steele scan of the same maps.

Precision: ``"complex128"``, ``"complex64"``, or ``"mixed"`` (forward in complex128, backward in
complex64, saved tensors stored in complex64). Real inputs may be float32 or float64; they are
converted to the compute precision and gradients are returned in each input's dtype. The output
is complex in the forward precision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "complex128": (torch.complex128, torch.complex128),
    "complex64": (torch.complex64, torch.complex64),
    "mixed": (torch.complex128, torch.complex64),
}

_REAL = {torch.complex128: torch.float64, torch.complex64: torch.float32}
_LOOP_BELOW = 8   # chains this short run as a plain loop (fewer tensor ops than the recursion)


# ----------------------------------------------------------------------------- scans

def _interleave(even: Tensor, odd: Tensor, n: int) -> Tensor:
    """(..., m) and (..., m) -> (..., 2m) as even, odd, even, ...; cut to n."""
    return torch.stack((even, odd), -1).flatten(-2)[..., :n]


def linear_scan(a: Tensor, u: Tensor) -> Tensor:
    """``x_0 = u_0``, ``x_k = a_k x_{k-1} + u_k`` along the last dim (``a_0`` is ignored).

    Odd-even recursion: O(N) work, O(log N) vectorised steps (a plain loop below 9 steps).
    """
    n = u.shape[-1]
    if n <= _LOOP_BELOW:
        return linear_scan_loop(a, u)
    if n % 2:
        a, u = F.pad(a, (0, 1)), F.pad(u, (0, 1))
    ae, ao, ue, uo = a[..., 0::2], a[..., 1::2], u[..., 0::2], u[..., 1::2]
    odd = linear_scan(ao * ae, torch.addcmul(uo, ao, ue))   # x at odd positions
    even = torch.empty_like(odd)
    even[..., 0] = ue[..., 0]
    even[..., 1:] = torch.addcmul(ue[..., 1:], ae[..., 1:], odd[..., :-1])
    return _interleave(even, odd, n)


def linear_scan_loop(a: Tensor, u: Tensor) -> Tensor:
    """Reference for :func:`linear_scan`: the plain loop."""
    out = torch.empty_like(u)
    x = u[..., 0]
    out[..., 0] = x
    for k in range(1, u.shape[-1]):
        x = a[..., k] * x + u[..., k]
        out[..., k] = x
    return out


def _moebius_prefix(p: Tensor, q: Tensor, r: Tensor, s: Tensor) -> Tensor:
    """Values ``f_k o ... o f_0 (inf)`` for maps ``f_k(x) = (p_k x + q_k) / (r_k x + s_k)``."""
    n = p.shape[-1]
    if n <= _LOOP_BELOW:
        out = torch.empty_like(p)
        x = p[..., 0] / r[..., 0]
        out[..., 0] = x
        for k in range(1, n):
            x = (p[..., k] * x + q[..., k]) / (r[..., k] * x + s[..., k])
            out[..., k] = x
        return out
    if n % 2:  # pad with the identity map
        p, q, r, s = F.pad(p, (0, 1), value=1.0), F.pad(q, (0, 1)), F.pad(r, (0, 1)), F.pad(s, (0, 1), value=1.0)
    pe, qe, re, se = p[..., 0::2], q[..., 0::2], r[..., 0::2], s[..., 0::2]
    po, qo, ro, so = p[..., 1::2], q[..., 1::2], r[..., 1::2], s[..., 1::2]
    # compose f_odd o f_even: [po qo; ro so] @ [pe qe; re se]; rescale (a Moebius map is scale-free)
    P = torch.addcmul(po * pe, qo, re)
    Q = torch.addcmul(po * qe, qo, se)
    R = torch.addcmul(ro * pe, so, re)
    S = torch.addcmul(ro * qe, so, se)
    # detached: the values are scale-free, so autograd through this recursion stays exact
    scale = torch.view_as_real(torch.stack((P, Q, R, S)).detach()).abs().amax((0, -1)).reciprocal_()
    odd = _moebius_prefix(P * scale, Q * scale, R * scale, S * scale)
    even = torch.empty_like(odd)
    even[..., 0] = pe[..., 0] / re[..., 0]
    prev = odd[..., :-1]
    even[..., 1:] = torch.addcmul(qe[..., 1:], pe[..., 1:], prev) / torch.addcmul(se[..., 1:], re[..., 1:], prev)
    return _interleave(even, odd, n)


def ratio_scan(alpha: Tensor, beta: Tensor) -> Tensor:
    """``d_0 = alpha_0``, ``d_k = alpha_k - beta_{k-1} / d_{k-1}`` along the last dim.

    ``alpha``: (..., N) complex; ``beta``: (..., N-1) complex. Odd-even recursion over the
    2x2 Moebius maps ``x -> (alpha_k x - beta_{k-1}) / x``; the even positions are filled in
    with the plain ratio step, so every value agrees with :func:`ratio_scan_loop` to rounding.
    """
    n = alpha.shape[-1]
    if n <= _LOOP_BELOW:
        return ratio_scan_loop(alpha, beta)
    if n % 2:  # a dummy last position; its value is dropped
        alpha = F.pad(alpha, (0, 1), value=1.0)
        beta = F.pad(beta, (0, 1))
    ae, ao = alpha[..., 0::2], alpha[..., 1::2]
    be = beta[..., 0::2]                      # beta_{2i}: couples 2i and 2i+1
    bo = F.pad(beta[..., 1::2], (1, 0))       # beta_{2i-1}: couples 2i-1 and 2i (0 for i = 0)
    # level 0 by hand: f_{2i+1} o f_{2i} = [ao*ae - be, -ao*bo; ae, -bo] (products of two inputs:
    # no rescaling needed)
    odd = _moebius_prefix(ao * ae - be, -(ao * bo), ae, -bo)
    even = torch.empty_like(odd)
    even[..., 0] = ae[..., 0]
    even[..., 1:] = ae[..., 1:] - bo[..., 1:] / odd[..., :-1]
    return _interleave(even, odd, n)


def ratio_scan_loop(alpha: Tensor, beta: Tensor) -> Tensor:
    """Reference for :func:`ratio_scan`: the plain loop (also differentiable by autograd)."""
    out = torch.empty_like(alpha)
    d = alpha[..., 0]
    out[..., 0] = d
    for k in range(1, alpha.shape[-1]):
        d = alpha[..., k] - beta[..., k - 1] / d
        out[..., k] = d
    return out


# ----------------------------------------------------------------------------- autograd function

def _reduce(grad: Tensor, like: tuple[torch.Size, torch.dtype]) -> Tensor:
    """Sum a broadcast gradient back to the shape (and dtype) of the input it belongs to."""
    shape, dtype = like
    if grad.shape != shape:
        grad = grad.sum_to_size(shape)
    if not dtype.is_complex and grad.is_complex():
        grad = grad.real
    return grad.to(dtype)


class _BKResolventDiag(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor, b: Tensor, c: Tensor, z: Tensor, d_init: Tensor | None,
                beta_init: Tensor | None, causal: bool, grad_blend: float, precision: str) -> Tensor:
        fdt, bdt = PRECISIONS[precision]
        rdt = _REAL[fdt]
        batch = torch.broadcast_shapes(v.shape[:-1], b.shape[:-1], c.shape[:-1], z.shape)
        n = v.shape[-1]
        vv = v.to(rdt).expand(*batch, n)
        bb = b.to(rdt).expand(*batch, n - 1)
        cc = c.to(rdt).expand(*batch, n - 1)
        beta = (bb * cc).to(fdt)
        alpha = vv.to(fdt) - z.to(fdt).expand(batch).unsqueeze(-1)
        if causal:
            if d_init is not None:
                a_ext = torch.cat((d_init.to(fdt).expand(batch).unsqueeze(-1), alpha), -1)
                b_ext = torch.cat((beta_init.to(rdt).expand(batch).unsqueeze(-1).to(fdt), beta), -1)
                d = ratio_scan(a_ext, b_ext)[..., 1:]
            else:
                d = ratio_scan(alpha, beta)
            G = d.reciprocal()
            ctx.save_for_backward(b, c, d.to(bdt), d_init, beta_init)
        else:
            both = ratio_scan(torch.stack((alpha, alpha.flip(-1))), torch.stack((beta, beta.flip(-1))))
            d, e = both[0], both[1].flip(-1)
            G = (d + e - alpha).reciprocal()
            ctx.save_for_backward(b, c, d.to(bdt), e.to(bdt), G.to(bdt))
        ctx.causal, ctx.grad_blend, ctx.bdt, ctx.batch = causal, grad_blend, bdt, batch
        ctx.like = [(t.shape, t.dtype) if t is not None else None for t in (v, b, c, z, d_init, beta_init)]
        return G

    @staticmethod
    def backward(ctx: Any, grad_G: Tensor) -> tuple[Tensor | None, ...]:
        bdt, rdt = ctx.bdt, _REAL[ctx.bdt]
        w = grad_G.to(bdt).conj()
        if ctx.causal:
            b, c, d, d_init, beta_init = ctx.saved_tensors
        else:
            b, c, d, e, G = ctx.saved_tensors
        batch, n = ctx.batch, d.shape[-1]
        beta = (b.to(rdt).expand(*batch, n - 1) * c.to(rdt).expand(*batch, n - 1)).to(bdt)
        sigma = beta / d[..., :-1].square()
        one = torch.ones_like(d[..., :1])
        if ctx.causal:
            G = d.reciprocal()
            u = w * G.square()
            T = linear_scan(torch.cat((one, sigma.flip(-1)), -1), u.flip(-1)).flip(-1)
            S = T
            gbeta = (T[..., 1:] / d[..., :-1]).real
        else:
            u = w * G.square()
            rho = beta / e[..., 1:].square()
            FT = linear_scan(torch.stack((torch.cat((one, rho), -1), torch.cat((one, sigma.flip(-1)), -1))),
                             torch.stack((u, u.flip(-1))))
            Fs, T = FT[0], FT[1].flip(-1)
            S = Fs + T - u
            gbeta = (Fs[..., :-1] / e[..., 1:] + T[..., 1:] / d[..., :-1]).real
        gv = -S.real
        if ctx.grad_blend:
            gb = ctx.grad_blend
            gv = (1.0 - gb) * gv + gb * (-(w / G.square()).real)
        like = ctx.like
        grads: list[Tensor | None] = [None] * 9
        if ctx.needs_input_grad[0]:
            grads[0] = _reduce(gv, like[0])
        if ctx.needs_input_grad[1]:
            grads[1] = _reduce(gbeta * c.to(rdt), like[1])
        if ctx.needs_input_grad[2]:
            grads[2] = _reduce(gbeta * b.to(rdt), like[2])
        if ctx.needs_input_grad[3]:
            grads[3] = _reduce(S.sum(-1).conj(), like[3])
        if ctx.causal and d_init is not None:
            # virtual position before 0: d_0 = alpha_0 - beta_init / d_init
            T0 = T[..., 0]
            di = d_init.to(bdt).expand(batch)
            if ctx.needs_input_grad[4]:
                # dL/dd_init (holomorphic) = (-T_0) * beta_init / d_init^2; PyTorch wants its conj
                bi = beta_init.to(rdt).expand(batch).to(bdt)
                grads[4] = _reduce((-T0 * bi / di.square()).conj(), like[4])
            if ctx.needs_input_grad[5]:
                grads[5] = _reduce((T0 / di).real, like[5])
        return tuple(grads)


# ----------------------------------------------------------------------------- public API

def _as_z(z: complex | Tensor, like: Tensor) -> Tensor:
    if isinstance(z, Tensor):
        if not z.is_complex():
            raise TypeError("z must be complex (a Python complex or a complex tensor)")
        return z
    return torch.tensor(complex(z), dtype=torch.complex128, device=like.device)


def _check(v: Tensor, b: Tensor, c: Tensor, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: allowed values are {', '.join(PRECISIONS)}")
    if v.is_complex() or b.is_complex() or c.is_complex():
        raise TypeError("v, b and c must be real tensors (H is a real tridiagonal matrix)")
    n = v.shape[-1]
    for name, t in (("b", b), ("c", c)):
        if t.shape[-1] != n - 1:
            raise ValueError(f"{name} has {t.shape[-1]} entries on its last dim; expected N-1 = {n - 1}")


def bk_resolvent_diag(v: Tensor, b: Tensor, c: Tensor, z: complex | Tensor, causal: bool = False,
                      grad_blend: float = 0.0, precision: str = "complex128",
                      init: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Diagonal of ``(H - z I)^-1`` for tridiagonal ``H``, batched, with the exact O(N) gradient.

    Args:
        v: (..., N) real, the diagonal of ``H`` (fold any fixed potential ``h0`` in here).
        b: (..., N-1) real super-diagonal, ``H[k, k+1]``; leading dims broadcast against ``v``.
        c: (..., N-1) real sub-diagonal, ``H[k+1, k]``.
        z: complex number or complex tensor broadcastable to ``v.shape[:-1]``; needs
            ``Im z > 0`` (then, for ``b_k c_k > 0``, every scan value stays away from zero).
        causal: return ``[(H_{0..k} - z)^-1]_kk = 1/d_k``, which sees positions ``0..k`` only.
        grad_blend: ablation knob, default 0 (exact gradient). The returned ``dL/dv`` becomes
            ``(1 - g) * exact + g * (-Re(w / G^2))``, a diagonal-only approximation that drops
            every ``i != j`` term of the exact sum; any ``g > 0`` is not the gradient of
            anything. ``b``, ``c``, ``z`` stay exact.
        precision: ``"complex128"``, ``"complex64"`` or ``"mixed"`` (forward 128 / backward 64).
        init: causal only: ``(d_prev, beta_prev)`` with shapes broadcastable to ``v.shape[:-1]``
            (complex, real): continue a sequence whose last forward-scan value was ``d_prev``,
            coupled to position 0 by ``beta_prev = b_prev * c_prev``.

    Returns:
        (..., N) complex tensor (complex128 unless ``precision="complex64"``).
    """
    _check(v, b, c, precision)
    zt = _as_z(z, v)
    if init is not None:
        if not causal:
            raise ValueError("init (a carried state) only makes sense with causal=True")
        d_init, beta_init = init
    else:
        d_init = beta_init = None
    return _BKResolventDiag.apply(v, b, c, zt, d_init, beta_init, causal, float(grad_blend), precision)


def bk_resolvent_diag_reference(v: Tensor, b: Tensor, c: Tensor, z: complex | Tensor,
                                causal: bool = False, method: str = "inv",
                                init: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Slow references, differentiable by plain autograd, in complex128.

    ``method="inv"``: dense ``torch.linalg.inv`` of ``H - zI`` (causal: of every leading block,
    O(N^4); keep N small). ``method="loop"``: the ratio-form scans as a Python loop over N.
    ``init`` (causal, loop only): as in :func:`bk_resolvent_diag`.
    """
    zt = _as_z(z, v).to(torch.complex128)
    batch = torch.broadcast_shapes(v.shape[:-1], b.shape[:-1], c.shape[:-1], zt.shape)
    n = v.shape[-1]
    vv = v.to(torch.float64).expand(*batch, n)
    bb = b.to(torch.float64).expand(*batch, n - 1)
    cc = c.to(torch.float64).expand(*batch, n - 1)
    alpha = vv.to(torch.complex128) - zt.expand(batch).unsqueeze(-1)
    if method == "loop":
        beta = (bb * cc).to(torch.complex128)
        if causal:
            if init is not None:
                d_prev, beta_prev = init
                dd = [alpha[..., 0] - beta_prev.to(torch.complex128) / d_prev.to(torch.complex128)]
            else:
                dd = [alpha[..., 0]]
            for k in range(1, n):
                dd.append(alpha[..., k] - beta[..., k - 1] / dd[-1])
            return 1 / torch.stack(dd, -1)
        dd, ee = [alpha[..., 0]], [alpha[..., n - 1]]
        for k in range(1, n):
            dd.append(alpha[..., k] - beta[..., k - 1] / dd[-1])
            ee.append(alpha[..., n - 1 - k] - beta[..., n - 1 - k] / ee[-1])
        return 1 / (torch.stack(dd, -1) + torch.stack(ee[::-1], -1) - alpha)
    if method != "inv":
        raise ValueError(f"method={method!r}: allowed values are 'inv', 'loop'")
    if init is not None:
        raise ValueError("init is supported by method='loop' only")
    A = torch.diag_embed(alpha) + torch.diag_embed(bb.to(torch.complex128), 1) \
        + torch.diag_embed(cc.to(torch.complex128), -1)
    if not causal:
        return _inv_each(A).diagonal(dim1=-2, dim2=-1)
    return torch.stack([_inv_each(A[..., : k + 1, : k + 1])[..., k, k] for k in range(n)], -1)


def _inv_each(A: Tensor) -> Tensor:
    """``torch.linalg.inv`` one matrix at a time.

    Batched complex LU of these tridiagonal matrices returned invalid pivots (``Pivots given to
    lu_solve must all be greater or equal to 1``, oneMKL ZLASWP errors) with 2 CPU threads on
    torch 2.13 at N = 256; single-matrix calls are correct, and a reference may be slow.
    """
    flat = A.reshape(-1, *A.shape[-2:])
    return torch.stack([torch.linalg.inv(m) for m in flat]).reshape(A.shape)
