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
  (NS_k = quintic Newton-Schulz, per weight matrix). A trailing partial chunk is read only.

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


def _inner_grads(weights: Weights, x: torch.Tensor, n_k: int, v: torch.Tensor, coef: torch.Tensor,
                 norm: bool, max_grad_norm: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One batched forward on rows x = [keys (n_k); queries], analytic backward on the keys.

    Returns the query outputs (..., R - n_k, out) and, for every weight, the coefficient-weighted sum
    of the per-key gradients: sum_i coef_i * clip(grad_W ||M_W(k_i) - v_i||^2).
    """
    n_layers = len(weights)
    acts = [x]          # inputs of each layer
    pres = []           # pre-activations of hidden layers
    h = x
    for i, w in enumerate(weights):
        z = h @ w.transpose(-1, -2)
        if i < n_layers - 1:
            pres.append(z)
            h = F.silu(z)
            acts.append(h)
        else:
            h = z
    if norm:
        mu = h.mean(-1, keepdim=True)
        hc = h - mu
        inv = torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + LN_EPS)
        h = hc * inv
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
                max_grad_norm: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Fast chunk-parallel memory. See the module docstring for the exact semantics.

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
    for n in range(n_chunks):
        rows = torch.cat([k[..., n * b: n * b + e + b, :], q[..., n * b: (n + 1) * b, :]], dim=-2)
        y, grads = _inner_grads(w_cur, rows, e + b, v[..., n * b: n * b + e + b, :], coef[..., n, :],
                                norm, max_grad_norm)
        ys.append(y)
        eta = mom[..., n, None, None]
        kp = keep[..., n, None, None]
        s_cur = [eta * s - g for s, g in zip(s_cur, grads)]
        if optimizer == "muon":
            lr_n = step[..., n, None, None]
            w_cur = [kp * w + lr_n * newton_schulz(s, ns_steps) for w, s in zip(w_cur, s_cur)]
        else:
            w_cur = [kp * w + s for w, s in zip(w_cur, s_cur)]
    if L > n_chunks * b:
        ys.append(memory_forward(w_cur, q[..., n_chunks * b:, :], norm))
    y = torch.cat(ys, dim=-2) if len(ys) > 1 else ys[0]
    return y, w_cur, s_cur


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
                          max_grad_norm: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
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
        if n >= n_chunks:
            continue                                   # partial chunk: read only
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
