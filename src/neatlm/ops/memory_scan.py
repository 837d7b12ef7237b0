"""Chunk-parallel test-time memory (Titans / Atlas) with analytic inner gradients.

Notation: leading dims ``...`` (usually batch, heads); L tokens; b = ``chunk_size``; c = ``window``
(the Omega window; c = 1 is the Titans one-token objective); e = c - 1 prefix rows.

Memory function (the *branch*; the layer adds any residual outside): weights W_1..W_D with
W_i of shape (..., out_i, in_i),

    M_W(x) = W_D silu(W_{D-1} ... silu(W_1 x))          (D = 1: linear memory, M_W(x) = W_1 x)
    optionally followed by a parameter-free LayerNorm (``norm=True``).

Inner loss per token: l_i(W) = || M_W(k_i) - v_i ||^2 (the layer folds a residual into v).

Semantics (identical in the fast path and in the token loop ``memory_scan_reference``). Tokens are
grouped into chunks of b consecutive tokens, chunk n = tokens [n b, (n+1) b). Let W^(n-1) be the
weights at the end of chunk n-1 (W^(-1) = the given ``weights``).

* read:   y_t = M_{W^(n-1)}(q_t) for every t in chunk n (read before write; complete or not);
* inner gradient of token t (Omega rule, all at the one point W^(n-1)):
          g_t = sum_{i = t-c+1 .. t} gamma_i * clip(grad_W l_i(W^(n-1)))
  where clip scales a per-token gradient to Frobenius norm <= max_grad_norm (0 = off) and i may
  reach back into the c-1 tokens before the chunk (the e prefix rows of k, v, gamma);
* one optimiser step per *complete* chunk, with per-token learning rates theta_t = ``lr`` and
  per-chunk momentum eta_n = ``mom`` and retention (1 - alpha_n) = ``keep``:
          S^(n) = eta_n S^(n-1) - sum_{t in chunk n} theta_t g_t
          momentum: W^(n) = keep_n W^(n-1) + S^(n)
          muon:     W^(n) = keep_n W^(n-1) + mean_t(theta_t) NS_k(S^(n))
  (NS_k = quintic Newton-Schulz, per weight matrix). A trailing partial chunk is read only, and so
  is any chunk n with ``updates[n]`` False (warmup, update frequency).

Fast path: per chunk, all b (+ e prefix) inner gradients come from one batched forward of the memory
on [keys; queries], one backward of the per-token deltas, and one weighted GEMM per weight matrix,
dW_i = (coef * Delta_i)^T A_{i-1}. No torch.func, no per-token weight copies; only chunks loop.
Outer gradients flow through these tensor expressions with ordinary autograd.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .newton_schulz import newton_schulz, newton_schulz_reference

LN_EPS = 1e-5
FUSED = True   # momentum optimiser: fused chunk step with a hand-written backward (False: plain autograd)

Weights = Sequence[torch.Tensor]


# ----------------------------------------------------------------------------- memory function

def memory_forward(weights: Weights, x: torch.Tensor, norm: bool = False) -> torch.Tensor:
    """M_W(x) for rows x: (..., R, in_1) -> (..., R, out_D)."""
    h = x
    last = len(weights) - 1
    for i, w in enumerate(weights):
        h = h @ w.transpose(-1, -2)
        if i < last:
            h = F.silu(h)
    if norm:
        h = F.layer_norm(h, h.shape[-1:], eps=LN_EPS)
    return h


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _forward_saving(weights: Weights, x: torch.Tensor, norm: bool):
    """M_W(x) keeping what the analytic backward needs: (output, layer inputs, hidden
    pre-activations, LayerNorm 1/std or None). Shared by the unfused and fused chunk steps."""
    acts, pres = [x], []  # inputs of each layer; pre-activations of hidden layers
    h = x
    for i, w in enumerate(weights):
        z = h @ w.transpose(-1, -2)
        if i < len(weights) - 1:
            pres.append(z)
            h = F.silu(z)
            acts.append(h)
        else:
            h = z
    inv = None
    if norm:
        hc = h - h.mean(-1, keepdim=True)
        inv = torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + LN_EPS)
        h = hc * inv
    return h, acts, pres, inv


def _inner_grads(weights: Weights, x: torch.Tensor, n_k: int, v: torch.Tensor, coef: torch.Tensor,
                 norm: bool, max_grad_norm: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One batched forward on rows x = [keys (n_k); queries], analytic backward on the keys.

    Returns the query outputs (..., R - n_k, out) and, for every weight, the coefficient-weighted sum
    of the per-key gradients: sum_i coef_i * clip(grad_W ||M_W(k_i) - v_i||^2).
    """
    n_layers = len(weights)
    h, acts, pres, inv = _forward_saving(weights, x, norm)
    y = h[..., n_k:, :]
    o = h[..., :n_k, :]
    delta = 2.0 * (o - v)                                      # d l / d o
    if norm:
        inv_k = inv[..., :n_k, :]
        delta = inv_k * (delta - delta.mean(-1, keepdim=True)
                         - o * (delta * o).mean(-1, keepdim=True))
    deltas = [delta]                                           # d l / d z_i, last layer first
    for i in range(n_layers - 1, 0, -1):
        delta = (delta @ weights[i]) * _silu_grad(pres[i - 1][..., :n_k, :])
        deltas.append(delta)
    deltas.reverse()
    ins = [a[..., :n_k, :] for a in acts]
    if max_grad_norm > 0:
        # ||grad_W l_i||^2 = sum over layers of ||delta_i||^2 ||a_i||^2 (each a rank-one outer product)
        sq = sum(d.pow(2).sum(-1) * a.pow(2).sum(-1) for d, a in zip(deltas, ins))
        gnorm = torch.sqrt(sq + 1e-30)
        coef = coef * (max_grad_norm / torch.clamp(gnorm, min=max_grad_norm))
    cw = coef.unsqueeze(-1)
    grads = [(d * cw).transpose(-1, -2) @ a for d, a in zip(deltas, ins)]
    return y, grads


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over the last two dims, shape (..., 1, 1). ``linalg.vecdot`` (a fused multiply and sum)
    is ~10x faster on CPU than the same dot written as a batched GEMV (1 x n @ n x 1)."""
    return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))[..., None, None]


class _MomentumStep(torch.autograd.Function):
    """S' = eta S + U,  W' = keep W + S'  (U = minus the chunk's summed inner gradient).

    One fused pass per weight matrix instead of five elementwise ops, and a backward that touches
    each weight-sized tensor the minimum number of times (the gate gradients are GEMV dot products).
    eta, keep: (..., 1, 1). Checked by gradcheck in tests/test_memory_ops.py.
    """

    @staticmethod
    def forward(ctx, w, s, u, eta, keep):
        s_new = torch.addcmul(u, eta, s)
        w_new = torch.addcmul(s_new, keep, w)
        ctx.save_for_backward(w, s, eta, keep)
        return w_new, s_new

    @staticmethod
    def backward(ctx, dw_new, ds_new):
        w, s, eta, keep = ctx.saved_tensors
        if dw_new is None:
            dw_new = torch.zeros_like(w)
        ds_tot = dw_new if ds_new is None else ds_new + dw_new
        dw = dw_new * keep if ctx.needs_input_grad[0] else None
        ds = ds_tot * eta if ctx.needs_input_grad[1] else None
        deta = _dot(s, ds_tot) if ctx.needs_input_grad[3] else None
        dkeep = _dot(w, dw_new) if ctx.needs_input_grad[4] else None
        return dw, ds, ds_tot, deta, dkeep


def momentum_step(w: torch.Tensor, s: torch.Tensor, u: torch.Tensor, eta: torch.Tensor,
                  keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', S') = (keep W + eta S + U, eta S + U) with eta, keep of shape (..., 1, 1)."""
    return _MomentumStep.apply(w, s, u, eta, keep)


def _band(b: int, e: int, like: torch.Tensor) -> torch.Tensor:
    """(b, e + b) 0/1 matrix: token t (in chunk) sums the rows j with t <= j <= t + e."""
    t = torch.arange(b, device=like.device).unsqueeze(1)
    j = torch.arange(b + e, device=like.device).unsqueeze(0)
    return ((j >= t) & (j <= t + e)).to(like.dtype)


def _check(q, k, v, lr, mom, keep, gamma, chunk_size, window):
    L = q.shape[-2]
    e = window - 1
    n = L // chunk_size
    if k.shape[-2] != L + e or v.shape[-2] != L + e:
        raise ValueError(f"k, v need L + window - 1 = {L + e} rows (got {k.shape[-2]}, {v.shape[-2]})")
    if lr.shape[-1] != L:
        raise ValueError(f"lr needs {L} entries (got {lr.shape[-1]})")
    if mom.shape[-1] != n or keep.shape[-1] != n:
        raise ValueError(f"mom, keep need one entry per complete chunk ({n})")
    if gamma is not None and gamma.shape[-1] != L + e:
        raise ValueError(f"gamma needs {L + e} entries")
    return L, e, n


def memory_scan(weights: Weights, momentum: Weights, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, lr: torch.Tensor, mom: torch.Tensor, keep: torch.Tensor,
                gamma: torch.Tensor | None = None, *, chunk_size: int, window: int = 1,
                norm: bool = False, optimizer: str = "momentum", ns_steps: int = 5,
                max_grad_norm: float = 0.0, updates: Sequence[bool] | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Fast chunk-parallel memory. See the module docstring for the exact semantics.

    ``updates[n]`` False makes complete chunk n read-only: no inner step, weights and momentum
    unchanged (test-time-learning warmup and update frequency); None = every chunk learns.

    weights, momentum: lists of (..., out_i, in_i).  q: (..., L, in_1).  k: (..., L+c-1, in_1),
    v: (..., L+c-1, out_D) (the first c-1 rows are the tokens before q[0]; pad with gamma = 0).
    lr: (..., L) per-token theta.  mom, keep: (..., L // chunk_size).  gamma: (..., L+c-1) or None
    (= 1).  Returns y (..., L, out_D) and the weights and momentum after the last complete chunk.
    """
    L, e, n_chunks = _check(q, k, v, lr, mom, keep, gamma, chunk_size, window)
    b = chunk_size
    w_cur = list(weights)
    s_cur = list(momentum)
    ys = []
    if n_chunks:
        theta = lr[..., : n_chunks * b].unflatten(-1, (n_chunks, b))        # (..., N, b)
        coef = theta @ _band(b, e, lr)                                       # (..., N, e+b)
        if gamma is not None:
            coef = coef * gamma[..., : n_chunks * b + e].unfold(-1, e + b, b)
        if optimizer == "muon":
            step = theta.mean(-1)                                            # (..., N)
        # every chunk's rows [its c-1 + b keys; its b queries] at once, so that the backward of the
        # per-chunk selection is one stack (not a zero-filled copy of k, q, v per chunk)
        k_rows = k[..., : n_chunks * b + e, :].unfold(-2, e + b, b).transpose(-1, -2)    # (..., N, e+b, dk)
        v_rows = v[..., : n_chunks * b + e, :].unfold(-2, e + b, b).transpose(-1, -2).unbind(-3)
        q_rows = q[..., : n_chunks * b, :].unflatten(-2, (n_chunks, b))
        x_rows = torch.cat([k_rows, q_rows], dim=-2).unbind(-3)
        coefs = (coef if optimizer == "muon" else -coef).unbind(-2)
        etas = mom[..., None, None].unbind(-3)
        keeps = keep[..., None, None].unbind(-3)
    for n in range(n_chunks):
        if updates is not None and not updates[n]:
            ys.append(memory_forward(w_cur, q_rows[..., n, :, :], norm))
            continue
        rows, c_n = x_rows[n], coefs[n]
        if optimizer == "momentum" and FUSED:
            y, w_cur, s_cur = chunk_step(w_cur, s_cur, rows, e + b, v_rows[n], c_n, etas[n], keeps[n], norm,
                                         max_grad_norm)
            ys.append(y)
            continue
        y, grads = _inner_grads(w_cur, rows, e + b, v_rows[n], c_n, norm, max_grad_norm)
        ys.append(y)
        eta, kp = etas[n], keeps[n]
        if optimizer == "muon":
            s_cur = [eta * s - g for s, g in zip(s_cur, grads)]
            lr_n = step[..., n, None, None]
            w_cur = [kp * w + lr_n * newton_schulz(s, ns_steps) for w, s in zip(w_cur, s_cur)]
        else:   # grads came out negated (coefficient -coef): U = -sum coef g
            new = [momentum_step(w, s, u, eta, kp) for w, s, u in zip(w_cur, s_cur, grads)]
            w_cur, s_cur = [p[0] for p in new], [p[1] for p in new]
    if L > n_chunks * b:
        ys.append(memory_forward(w_cur, q[..., n_chunks * b:, :], norm))
    y = torch.cat(ys, dim=-2) if len(ys) > 1 else ys[0]
    return y, w_cur, s_cur


# ----------------------------------------------------------------------------- fused chunk step

def _silu_grad2(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


def _acc_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b in place (one GEMM, no temporary); out contiguous (..., m, n)."""
    if not out.is_contiguous():
        out += a @ b
    elif out.dim() == 2:
        out.addmm_(a, b)
    else:
        out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))


class _ChunkStep(torch.autograd.Function):
    """One chunk of the momentum optimiser, forward and hand-written backward.

    Same maths as ``_inner_grads`` followed by ``momentum_step`` (the unfused path, kept for Muon and
    as the autograd check): reads of the query rows, analytic inner gradients of the key rows
    (optionally clipped), U = sum_i c_i g_i, S' = eta S + U, W' = keep W + S'. The backward
    differentiates that whole computation (including the second-order terms through the analytic
    inner gradient) with the minimum of GEMMs and without autograd's per-op temporaries.
    Checked by gradcheck and against autograd through the unfused path in tests/test_memory_ops.py.
    """

    @staticmethod
    def forward(ctx, x, v, c, eta, kp, n_k, norm, cap, n_w, *ws_ss):
        ws, ss = ws_ss[:n_w], ws_ss[n_w:]
        D = n_w
        o, acts, pres, inv = _forward_saving(ws, x, norm)
        bm = None
        y = o[..., n_k:, :]
        ok = o[..., :n_k, :]
        r = 2.0 * (ok - v)
        if norm:
            inv_k = inv[..., :n_k, :]
            bm = (r * ok).mean(-1, keepdim=True)
            delta = inv_k * (r - r.mean(-1, keepdim=True) - ok * bm)
        else:
            delta = r
        deltas, ms, sps = [delta], [], []
        for i in range(D - 2, -1, -1):
            sp = _silu_grad(pres[i][..., :n_k, :])
            m = delta @ ws[i + 1]
            delta = m * sp
            deltas.append(delta)
            ms.append(m)
            sps.append(sp)
        deltas.reverse()
        ms.reverse()
        sps.reverse()
        ins = [a[..., :n_k, :] for a in acts]
        gnorm = scale = None
        if cap > 0:
            gnorm = torch.sqrt(sum(d.pow(2).sum(-1) * a.pow(2).sum(-1) for d, a in zip(deltas, ins)) + 1e-30)
            scale = cap / torch.clamp(gnorm, min=cap)
            cp = c * scale
        else:
            cp = c
        cpw = cp.unsqueeze(-1)
        w_new, s_new = [], []
        for d, a, w, s in zip(deltas, ins, ws, ss):
            # out of place: torch's selective checkpointing caches GEMM outputs and replays the ops
            # after them, so an in-place add onto one corrupts the replay (wrong gradients)
            sn = torch.addcmul((d * cpw).transpose(-1, -2) @ a, s, eta)
            s_new.append(sn)
            w_new.append(torch.addcmul(sn, kp, w))
        ctx.n_k, ctx.norm, ctx.cap, ctx.D = n_k, norm, cap, D
        ctx.save_for_backward(x, c, eta, kp, o, r, *([inv, bm] if norm else []),
                              *([gnorm, scale] if cap > 0 else []), cp,
                              *ws, *ss, *pres, *acts[1:], *deltas, *ms, *sps)
        return (y, *w_new, *s_new)

    @staticmethod
    def backward(ctx, gy, *gws_gss):
        n_k, norm, cap, D = ctx.n_k, ctx.norm, ctx.cap, ctx.D
        saved = list(ctx.saved_tensors)
        x, c, eta, kp, o, r = saved[:6]
        p = 6
        if norm:
            inv, bm = saved[p:p + 2]
            p += 2
        if cap > 0:
            gnorm, scale = saved[p:p + 2]
            p += 2
        cp = saved[p]
        p += 1
        take = lambda k: saved[p:p + k]  # noqa: E731
        ws = take(D); p += D
        ss = take(D); p += D
        pres = take(D - 1); p += D - 1
        acts = [x] + list(take(D - 1)); p += D - 1
        deltas = list(take(D)); p += D
        ms = take(D - 1); p += D - 1
        sps = take(D - 1); p += D - 1
        gw_new, gs_new = gws_gss[:D], gws_gss[D:]
        ins = [a[..., :n_k, :] for a in acts]

        # state update: S' = eta S + U, W' = kp W + S'
        gws, gss, g_eta, g_kp, gus = [], [], 0.0, 0.0, []
        for w, s, gw, gs in zip(ws, ss, gw_new, gs_new):
            gtot = gs + gw
            gus.append(gtot)
            gws.append(gw * kp)
            gss.append(gtot * eta)
            g_eta = g_eta + _dot(s, gtot)
            g_kp = g_kp + _dot(w, gw)
        # U_i = (cp * Delta_i)^T A_i
        cpw = cp.unsqueeze(-1)
        g_delta, g_ins, g_cp = [], [], 0.0
        for d, a, gu in zip(deltas, ins, gus):
            gp = a @ gu.transpose(-1, -2)                      # d U / d (cp * Delta)
            g_ins.append((d * cpw) @ gu)
            g_delta.append(gp * cpw)
            g_cp = g_cp + (gp * d).sum(-1)
        if cap > 0:
            g_c = g_cp * scale
            active = (gnorm > cap).to(c.dtype)
            gn_over_n = -g_cp * c * cap / gnorm.pow(3) * active   # (dL/dn) / n
            for i, (d, a) in enumerate(zip(deltas, ins)):
                g_delta[i] = g_delta[i] + (gn_over_n * a.pow(2).sum(-1)).unsqueeze(-1) * d
                g_ins[i] = g_ins[i] + (gn_over_n * d.pow(2).sum(-1)).unsqueeze(-1) * a
        else:
            g_c = g_cp
        # Delta_i = (Delta_{i+1} W_{i+1}) * silu'(Z_i)  (key rows), bottom up
        g_zk = [None] * (D - 1)
        for i in range(D - 1):
            gm = g_delta[i] * sps[i]
            g_zk[i] = g_delta[i] * ms[i] * _silu_grad2(pres[i][..., :n_k, :])
            g_delta[i + 1] = g_delta[i + 1] + gm @ ws[i + 1].transpose(-1, -2)
            _acc_matmul(gws[i + 1], deltas[i + 1].transpose(-1, -2), gm)
        # output delta
        gd = g_delta[D - 1]
        ok = o[..., :n_k, :]
        if norm:
            inv_k = inv[..., :n_k, :]
            gdo = (gd * ok).mean(-1, keepdim=True)
            g_r = inv_k * (gd - gd.mean(-1, keepdim=True) - ok * gdo)
            g_ok = -inv_k * (gd * bm + r * gdo)
            g_inv_k = (gd * deltas[D - 1]).sum(-1, keepdim=True) / inv_k
        else:
            g_r = gd
            g_ok = torch.zeros_like(ok)
        g_v = -2.0 * g_r
        g_o = torch.cat([g_ok + 2.0 * g_r, gy], dim=-2)
        if norm:
            g_z = inv * (g_o - g_o.mean(-1, keepdim=True) - o * (g_o * o).mean(-1, keepdim=True))
            g_z[..., :n_k, :] -= g_inv_k * inv_k.pow(2) * ok / ok.shape[-1]
        else:
            g_z = g_o
        # plain backward of the forward MLP over all rows
        g_x = None
        for i in range(D - 1, -1, -1):
            _acc_matmul(gws[i], g_z.transpose(-1, -2), acts[i])
            g_a = g_z @ ws[i]
            g_a[..., :n_k, :] += g_ins[i]
            if i == 0:
                g_x = g_a
            else:
                g_z = g_a * _silu_grad(pres[i - 1])
                g_z[..., :n_k, :] += g_zk[i - 1]
        return (g_x, g_v, g_c, g_eta, g_kp, None, None, None, None, *gws, *gss)


def chunk_step(weights: Weights, momentum: Weights, x: torch.Tensor, n_k: int, v: torch.Tensor,
               coef: torch.Tensor, eta: torch.Tensor, keep: torch.Tensor, norm: bool = False,
               max_grad_norm: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Fused read + inner gradients + momentum step of one chunk. x = [keys (n_k); queries] rows.

    coef: (..., n_k) signed row weights (U = sum_i coef_i clip(g_i)); eta, keep: (..., 1, 1).
    Returns the query reads and the new weights and momentum.
    """
    out = _ChunkStep.apply(x, v, coef, eta, keep, n_k, norm, float(max_grad_norm), len(weights),
                           *weights, *momentum)
    D = len(weights)
    return out[0], list(out[1:1 + D]), list(out[1 + D:])


# ----------------------------------------------------------------------------- reference loop

def memory_forward_reference(weights: Weights, x: torch.Tensor, norm: bool = False) -> torch.Tensor:
    """M_W(x) for one token per leading index: x (..., in_1) -> (..., out_D)."""
    h = x
    for i, w in enumerate(weights):
        h = (w @ h.unsqueeze(-1)).squeeze(-1)
        if i < len(weights) - 1:
            h = h * torch.sigmoid(h)
    if norm:
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        h = (h - mu) / torch.sqrt(var + LN_EPS)
    return h


def _token_grad_reference(weights: Weights, k_t: torch.Tensor, v_t: torch.Tensor, norm: bool,
                          max_grad_norm: float) -> list[torch.Tensor]:
    """grad_W ||M_W(k_t) - v_t||^2 by autograd (independent of the analytic formulas), clipped."""
    with torch.enable_grad():
        ws = [w if w.requires_grad else w.detach().requires_grad_(True) for w in weights]
        loss = ((memory_forward_reference(ws, k_t, norm) - v_t) ** 2).sum()
        grads = list(torch.autograd.grad(loss, ws, create_graph=True))
    if max_grad_norm > 0:
        gnorm = torch.sqrt(sum((g ** 2).sum((-2, -1)) for g in grads))
        scale = torch.where(gnorm > max_grad_norm, max_grad_norm / gnorm, torch.ones_like(gnorm))
        grads = [g * scale[..., None, None] for g in grads]
    return grads


def memory_scan_reference(weights: Weights, momentum: Weights, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, lr: torch.Tensor, mom: torch.Tensor, keep: torch.Tensor,
                          gamma: torch.Tensor | None = None, *, chunk_size: int, window: int = 1,
                          norm: bool = False, optimizer: str = "momentum", ns_steps: int = 5,
                          max_grad_norm: float = 0.0, updates: Sequence[bool] | None = None,
                          ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Token loop with the semantics of :func:`memory_scan` (same arguments and results)."""
    L, e, n_chunks = _check(q, k, v, lr, mom, keep, gamma, chunk_size, window)
    b = chunk_size
    if gamma is None:
        gamma = torch.ones(k.shape[:-1], dtype=k.dtype, device=k.device)
    w_cur = list(weights)
    s_cur = list(momentum)
    ys = []
    for t in range(L):
        n = t // b
        if t % b == 0:
            w_start = list(w_cur)                      # the linearisation point of chunk n
            total = [torch.zeros_like(w) for w in w_cur]
        ys.append(memory_forward_reference(w_start, q[..., t, :], norm))
        if n >= n_chunks or (updates is not None and not updates[n]):
            continue                                   # partial or read-only chunk
        for i in range(t - window + 1, t + 1):         # Omega window, row i + e of k, v, gamma
            g_i = _token_grad_reference(w_start, k[..., i + e, :], v[..., i + e, :], norm, max_grad_norm)
            wgt = (lr[..., t] * gamma[..., i + e])[..., None, None]
            total = [acc + wgt * g for acc, g in zip(total, g_i)]
        if t % b == b - 1:                             # end of a complete chunk: one optimiser step
            eta = mom[..., n, None, None]
            kp = keep[..., n, None, None]
            s_cur = [eta * s - g for s, g in zip(s_cur, total)]
            if optimizer == "muon":
                lr_n = lr[..., n * b: (n + 1) * b].mean(-1)[..., None, None]
                w_cur = [kp * w + lr_n * newton_schulz_reference(s, ns_steps) for w, s in zip(w_cur, s_cur)]
            else:
                w_cur = [kp * w + s for w, s in zip(w_cur, s_cur)]
    return torch.stack(ys, dim=-2), w_cur, s_cur
