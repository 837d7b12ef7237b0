"""Chunk-parallel test-time memory (Titans / Atlas): the fast path.

Notation: leading dims ``...`` (usually batch, heads); L tokens; b = ``chunk_size``; c = ``window``
(the Omega window; c = 1 is the Titans one-token objective); e = c - 1 prefix rows.

Memory branch (the layer adds any residual outside): weights W_1..W_D, W_i of shape
(..., out_i, in_i), ``M_W(x) = W_D silu(W_{D-1} ... silu(W_1 x))``, optionally followed by a
parameter-free LayerNorm (``norm=True``). Inner loss per token: ``l_i(W) = ||M_W(k_i) - v_i||^2``.

Semantics, identical to the token loop in :mod:`.naive` (derivation in ``docs/memory.md``): chunk n
holds tokens [n b, (n+1) b); every token of chunk n reads with the weights W^(n-1) from the end of
the previous chunk, and every inner gradient of chunk n is taken at that same point. One optimiser
step per complete chunk, with per-token learning rates theta_t = ``lr``, per-chunk momentum
eta_n = ``mom`` and retention keep_n = 1 - alpha_n = ``keep``:

    g_t = sum_{i = t-c+1 .. t} gamma_i clip(grad_W l_i(W^(n-1)))
    S^(n) = eta_n S^(n-1) - sum_{t in chunk n} theta_t g_t
    momentum: W^(n) = keep_n W^(n-1) + S^(n)
    muon:     W^(n) = keep_n W^(n-1) + mean_t(theta_t) NS_k(S^(n))

A trailing partial chunk is read only, and so is any chunk n with ``updates[n]`` False.

Why it is fast: per chunk, all e + b inner gradients come from one batched forward of the memory
on [keys; queries], one backward of the per-key deltas, and one weighted GEMM per weight matrix,
``sum_i coef_i grad_{W_j} l_i = (coef * Delta_j)^T A_{j-1}``. No per-token weight copies; only the
chunks loop. With the momentum optimiser each chunk is one autograd Function whose backward is
written by hand (:func:`chunk_step_fwd` / :func:`chunk_step_bwd`): autograd would keep a temporary
per elementwise op and differentiate the second-order terms op by op.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..newton_schulz import newton_schulz
from .common import LN_EPS, Weights, check_scan_inputs


# ----------------------------------------------------------------------------- memory function

def memory_forward(weights: Weights, x: Tensor, norm: bool = False) -> Tensor:
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


def _silu_grad(z: Tensor) -> Tensor:
    """silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)."""
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _silu_grad2(z: Tensor) -> Tensor:
    """silu''(z) = s (1 - s) (2 + z (1 - 2 s)): the inner gradient holds silu', so its backward needs this."""
    s = torch.sigmoid(z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


# ----------------------------------------------------------------------------- inner gradients

class InnerTerms(NamedTuple):
    """The forward on rows [keys (n_k); queries] and the analytic inner-gradient recursion on the
    keys. It holds every intermediate, because the fused backward differentiates through them."""

    out: Tensor                # M_W(x), all rows (..., R, out_D)
    acts: list[Tensor]         # input of each layer, all rows; acts[0] = x
    pres: list[Tensor]         # pre-activation of each hidden layer, all rows
    inv: Tensor | None         # LayerNorm 1/std per row (norm only)
    r: Tensor                  # 2 (o - v) on the key rows: d l / d(branch output)
    bm: Tensor | None          # mean over features of r * o, key rows (norm only)
    deltas: list[Tensor]       # Delta_j = d l / d z_j per layer, key rows
    ms: list[Tensor]           # Delta_{j+1} W_{j+1} per hidden layer, key rows
    sps: list[Tensor]          # silu'(z_j) per hidden layer, key rows
    gnorm: Tensor | None       # ||grad_W l_i||_F per key (clipping only)
    sq_deltas: list[Tensor]    # ||Delta_j||^2 per key row and layer (clipping only, else empty)
    sq_ins: list[Tensor]       # ||A_j||^2 of each layer's input per key row (clipping only, else empty)
    scale: Tensor | None       # clip factor max_grad_norm / max(gnorm, max_grad_norm) (clipping only)
    coef: Tensor               # row weights after clipping (..., n_k)


def _forward_saving(weights: Weights, x: Tensor, norm: bool
                    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
    """M_W(x) keeping what the analytic gradients need: (output, layer inputs, hidden
    pre-activations, LayerNorm 1/std or None)."""
    acts, pres = [x], []
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


def inner_grad_terms(weights: Weights, x: Tensor, n_k: int, v: Tensor, coef: Tensor, norm: bool,
                     max_grad_norm: float) -> InnerTerms:
    """One batched forward on rows x = [keys (n_k); queries]; the per-key deltas of the inner loss
    by the chain rule (no autograd), and the per-key clip of the row weights ``coef``.

    The one implementation of the inner-gradient recursion: the fused chunk step saves its result
    for the hand-written backward, the unfused path lets autograd differentiate it.
    """
    n_layers = len(weights)
    out, acts, pres, inv = _forward_saving(weights, x, norm)
    o = out[..., :n_k, :]
    r = 2.0 * (o - v)
    bm = None
    if norm:
        # LayerNorm backward (no affine): inv (r - mean(r) - o mean(r o)), o the normalised output
        r_mean = r.mean(-1, keepdim=True)
        bm = (r * o).mean(-1, keepdim=True)
        delta = inv[..., :n_k, :] * (r - r_mean - o * bm)
    else:
        delta = r
    deltas, ms, sps = [delta], [], []                       # built last layer first
    for j in range(n_layers - 2, -1, -1):
        sp = _silu_grad(pres[j][..., :n_k, :])
        m = delta @ weights[j + 1]
        delta = m * sp
        deltas.append(delta)
        ms.append(m)
        sps.append(sp)
    deltas.reverse()
    ms.reverse()
    sps.reverse()
    gnorm = scale = None
    sq_deltas: list[Tensor] = []
    sq_ins: list[Tensor] = []
    if max_grad_norm > 0:
        # each layer's per-token gradient is the outer product Delta_j a_j^T, whose squared
        # Frobenius norm is ||Delta_j||^2 ||a_j||^2: no per-token gradient is ever formed
        sq_deltas = [_sq_norm(d) for d in deltas]
        sq_ins = [_sq_norm(a[..., :n_k, :]) for a in acts]
        gnorm = torch.sqrt(sum(sd * sa for sd, sa in zip(sq_deltas, sq_ins)) + 1e-30)
        scale = max_grad_norm / torch.clamp(gnorm, min=max_grad_norm)
        coef = coef * scale
    return InnerTerms(out, acts, pres, inv, r, bm, deltas, ms, sps, gnorm, sq_deltas, sq_ins, scale, coef)


def _sq_norm(t: Tensor) -> Tensor:
    """||t||^2 over the last dim as one multiply-and-sum (``pow(2).sum`` is two passes, about 3x
    slower on CPU at the memory's row widths). Not ``vector_norm(t).square()``: with it, a run
    whose micro-batch was halved after two steps drifted beyond 1e-5 from one run at the halved
    size throughout (tests/test_oom_fallback.py); this one keeps them together."""
    return torch.linalg.vecdot(t, t)


def weighted_grads(terms: InnerTerms, n_k: int) -> list[Tensor]:
    """sum_i coef_i grad_{W_j} l_i = (coef * Delta_j)^T A_{j-1}: one GEMM per weight matrix."""
    cw = terms.coef.unsqueeze(-1)
    return [(d * cw).transpose(-1, -2) @ a[..., :n_k, :] for d, a in zip(terms.deltas, terms.acts)]


def inner_grads(weights: Weights, x: Tensor, n_k: int, v: Tensor, coef: Tensor, norm: bool,
                max_grad_norm: float) -> tuple[Tensor, list[Tensor]]:
    """Query reads (..., R - n_k, out_D) and, per weight, sum_i coef_i clip(grad_W l_i).

    The unfused chunk step's inner gradients (one batched recursion for every row of the chunk).
    """
    terms = inner_grad_terms(weights, x, n_k, v, coef, norm, max_grad_norm)
    return terms.out[..., n_k:, :], weighted_grads(terms, n_k)


# ----------------------------------------------------------------------------- fused chunk step

class ChunkSaved(NamedTuple):
    """What the backward of one fused chunk step reads (x is ``terms.acts[0]``)."""

    coef: Tensor               # signed row weights before clipping (..., n_k)
    eta: Tensor                # (..., 1, 1)
    keep: Tensor               # (..., 1, 1)
    weights: list[Tensor]
    momentum: list[Tensor]
    terms: InnerTerms


class ChunkGrads(NamedTuple):
    """Gradients of the outer loss with respect to every tensor input of a chunk step."""

    x: Tensor
    v: Tensor
    coef: Tensor
    eta: Tensor
    keep: Tensor
    weights: list[Tensor]
    momentum: list[Tensor]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> over the last two dims, shape (..., 1, 1). ``linalg.vecdot`` is one fused multiply and
    sum; the same dot as a batched (1 x n) @ (n x 1) GEMV is far slower on CPU."""
    return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))[..., None, None]


def _acc_matmul(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b in place (one GEMM, no temporary); out contiguous (..., m, n)."""
    if not out.is_contiguous():
        out += a @ b
    elif out.dim() == 2:
        out.addmm_(a, b)
    else:
        out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))


def chunk_step_fwd(weights: Weights, momentum: Weights, x: Tensor, n_k: int, v: Tensor, coef: Tensor,
                   eta: Tensor, keep: Tensor, norm: bool, max_grad_norm: float
                   ) -> tuple[Tensor, list[Tensor], list[Tensor], ChunkSaved]:
    """Reads of the query rows, U = sum_i coef_i clip(g_i) over the key rows, S' = eta S + U,
    W' = keep W + S'. Returns (y, W', S') and what :func:`chunk_step_bwd` needs."""
    terms = inner_grad_terms(weights, x, n_k, v, coef, norm, max_grad_norm)
    w_new, s_new = [], []
    for u, w, s in zip(weighted_grads(terms, n_k), weights, momentum):
        # out of place: torch's selective checkpointing caches GEMM outputs and replays the ops
        # after them, so an in-place add onto one corrupts the replay (wrong gradients)
        sn = torch.addcmul(u, s, eta)
        s_new.append(sn)
        w_new.append(torch.addcmul(sn, keep, w))
    saved = ChunkSaved(coef, eta, keep, list(weights), list(momentum), terms)
    return terms.out[..., n_k:, :], w_new, s_new, saved


def _state_update_bwd(saved: ChunkSaved, g_w_new: Sequence[Tensor | None], g_s_new: Sequence[Tensor | None]
                      ) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor, Tensor]:
    """Through S' = eta S + U, W' = keep W + S': (dU, dW partial, dS, d eta, d keep). A None
    gradient is an output nothing used (W' under Muon, the state after a sequence's last chunk):
    its terms are skipped rather than computed from zeros."""
    g_u, g_w, g_s = [], [], []
    g_eta: Any = torch.zeros_like(saved.eta)
    g_keep: Any = torch.zeros_like(saved.keep)
    for w, s, gw, gs in zip(saved.weights, saved.momentum, g_w_new, g_s_new):
        if gw is None:
            gtot = torch.zeros_like(w) if gs is None else gs
            g_w.append(torch.zeros_like(w))
        else:
            gtot = gw if gs is None else gs + gw
            g_w.append(gw * saved.keep)
            g_keep = g_keep + _dot(w, gw)
        g_u.append(gtot)
        g_s.append(gtot * saved.eta)
        g_eta = g_eta + _dot(s, gtot)
    return g_u, g_w, g_s, g_eta, g_keep


def _weighted_sum_bwd(terms: InnerTerms, ins: list[Tensor], g_u: list[Tensor]
                      ) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Through U_j = (coef * Delta_j)^T A_j: (d Delta_j, d A_j on the key rows, d coef)."""
    cw = terms.coef.unsqueeze(-1)
    g_delta, g_ins = [], []
    g_coef: Any = 0.0
    for d, a, gu in zip(terms.deltas, ins, g_u):
        gp = a @ gu.transpose(-1, -2)                      # d U / d (coef * Delta)
        g_ins.append((d * cw) @ gu)
        g_delta.append(gp * cw)
        g_coef = g_coef + (gp * d).sum(-1)
    return g_delta, g_ins, g_coef


def _clip_bwd(saved: ChunkSaved, ins: list[Tensor], g_delta: list[Tensor], g_ins: list[Tensor],
              g_coef: Tensor, max_grad_norm: float) -> Tensor:
    """Through coef' = coef * cap / max(n, cap), n^2 = sum_j ||Delta_j||^2 ||A_j||^2: adds the
    norm's share to g_delta and g_ins (in place) and returns d coef (before clipping)."""
    terms = saved.terms
    if max_grad_norm <= 0:
        return g_coef
    gnorm = terms.gnorm
    active = (gnorm > max_grad_norm).to(saved.coef.dtype)
    gn_over_n = -g_coef * saved.coef * max_grad_norm / gnorm.pow(3) * active   # (dL/dn) / n
    for j, (d, a) in enumerate(zip(terms.deltas, ins)):
        g_delta[j] = g_delta[j] + (gn_over_n * terms.sq_ins[j]).unsqueeze(-1) * d
        g_ins[j] = g_ins[j] + (gn_over_n * terms.sq_deltas[j]).unsqueeze(-1) * a
    return g_coef * terms.scale


def _recursion_bwd(saved: ChunkSaved, g_delta: list[Tensor], g_w: list[Tensor], n_k: int) -> list[Tensor]:
    """Through Delta_j = (Delta_{j+1} W_{j+1}) * silu'(Z_j) on the key rows, first layer up.

    Pushes each g_delta[j] into g_delta[j + 1] and g_w[j + 1] (in place); returns the gradients of
    the key rows' hidden pre-activations that flow through silu'."""
    terms, weights = saved.terms, saved.weights
    g_zk = []
    for j in range(len(weights) - 1):
        gm = g_delta[j] * terms.sps[j]
        g_zk.append(g_delta[j] * terms.ms[j] * _silu_grad2(terms.pres[j][..., :n_k, :]))
        g_delta[j + 1] = g_delta[j + 1] + gm @ weights[j + 1].transpose(-1, -2)
        _acc_matmul(g_w[j + 1], terms.deltas[j + 1].transpose(-1, -2), gm)
    return g_zk


def _loss_bwd(terms: InnerTerms, g_delta_out: Tensor, gy: Tensor, n_k: int, norm: bool
              ) -> tuple[Tensor, Tensor]:
    """Through the output delta (r = 2 (o - v), optionally LayerNorm's backward) and the read:
    returns (dv, d of the last layer's pre-norm output on all rows)."""
    gd = g_delta_out
    o, ok = terms.out, terms.out[..., :n_k, :]
    if norm:
        inv_k = terms.inv[..., :n_k, :]
        gdo = (gd * ok).mean(-1, keepdim=True)
        g_r = inv_k * (gd - gd.mean(-1, keepdim=True) - ok * gdo)
        g_ok = -inv_k * (gd * terms.bm + terms.r * gdo)
        g_inv_k = (gd * terms.deltas[-1]).sum(-1, keepdim=True) / inv_k
    else:
        g_r = gd
        g_ok = torch.zeros_like(ok)
    g_v = -2.0 * g_r
    g_o = torch.cat([g_ok + 2.0 * g_r, gy], dim=-2)
    if not norm:
        return g_v, g_o
    inv = terms.inv
    g_z = inv * (g_o - g_o.mean(-1, keepdim=True) - o * (g_o * o).mean(-1, keepdim=True))
    g_z[..., :n_k, :] -= g_inv_k * inv_k.pow(2) * ok / ok.shape[-1]
    return g_v, g_z


def _mlp_bwd(saved: ChunkSaved, g_z: Tensor, g_ins: list[Tensor], g_zk: list[Tensor], g_w: list[Tensor],
             n_k: int) -> Tensor:
    """Plain backward of the memory MLP over all rows, adding on the key rows what reached each
    layer input (g_ins) and hidden pre-activation (g_zk) through the inner gradient. Accumulates
    into g_w in place; returns dx."""
    terms, weights = saved.terms, saved.weights
    for j in range(len(weights) - 1, -1, -1):
        _acc_matmul(g_w[j], g_z.transpose(-1, -2), terms.acts[j])
        g_a = g_z @ weights[j]
        g_a[..., :n_k, :] += g_ins[j]
        if j:
            g_z = torch.ops.aten.silu_backward(g_a, terms.pres[j - 1])   # g_a * silu'(z), one kernel
            g_z[..., :n_k, :] += g_zk[j - 1]
    return g_a


def chunk_step_bwd(saved: ChunkSaved, gy: Tensor, g_w_new: Sequence[Tensor | None],
                   g_s_new: Sequence[Tensor | None],
                   n_k: int, norm: bool, max_grad_norm: float) -> ChunkGrads:
    """Gradients of :func:`chunk_step_fwd`, including the second-order terms through the analytic
    inner gradient (derivation in ``docs/memory.md``). Stages in reverse order of the forward."""
    ins = [a[..., :n_k, :] for a in saved.terms.acts]
    g_u, g_w, g_s, g_eta, g_keep = _state_update_bwd(saved, g_w_new, g_s_new)
    g_delta, g_ins, g_coef = _weighted_sum_bwd(saved.terms, ins, g_u)
    g_coef = _clip_bwd(saved, ins, g_delta, g_ins, g_coef, max_grad_norm)
    g_zk = _recursion_bwd(saved, g_delta, g_w, n_k)
    g_v, g_z = _loss_bwd(saved.terms, g_delta[-1], gy, n_k, norm)
    g_x = _mlp_bwd(saved, g_z, g_ins, g_zk, g_w, n_k)
    return ChunkGrads(g_x, g_v, g_coef, g_eta, g_keep, g_w, g_s)


def _flatten(tree: Any) -> tuple[list[Tensor | None], Any]:
    """Tensors (and Nones) of nested NamedTuples / lists in order, and the layout to rebuild them:
    ``save_for_backward`` takes a flat argument list."""
    if tree is None or isinstance(tree, Tensor):
        return [tree], None
    leaves, layouts = [], []
    for item in tree:
        sub, lay = _flatten(item)
        leaves += sub
        layouts.append((len(sub), lay))
    return leaves, (type(tree), layouts)


def _unflatten(leaves: Sequence[Tensor | None], layout: Any) -> Any:
    if layout is None:
        return leaves[0]
    kind, parts = layout
    items, p = [], 0
    for size, lay in parts:
        items.append(_unflatten(leaves[p:p + size], lay))
        p += size
    return kind(items) if kind in (list, tuple) else kind(*items)


class ChunkStep(torch.autograd.Function):
    """One chunk of the momentum optimiser: :func:`chunk_step_fwd` and :func:`chunk_step_bwd`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, v: Tensor, coef: Tensor, eta: Tensor, keep: Tensor, n_k: int,
                norm: bool, max_grad_norm: float, n_w: int, *weights_momentum: Tensor) -> tuple[Tensor, ...]:
        y, w_new, s_new, saved = chunk_step_fwd(weights_momentum[:n_w], weights_momentum[n_w:], x, n_k, v,
                                                coef, eta, keep, norm, max_grad_norm)
        leaves, ctx.layout = _flatten(saved)
        ctx.save_for_backward(*leaves)
        ctx.set_materialize_grads(False)   # unused outputs' gradients arrive as None (see _state_update_bwd)
        ctx.n_k, ctx.norm, ctx.max_grad_norm, ctx.n_w = n_k, norm, max_grad_norm, n_w
        return (y, *w_new, *s_new)

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, *g_new: Tensor | None) -> tuple[Tensor | None, ...]:
        saved: ChunkSaved = _unflatten(ctx.saved_tensors, ctx.layout)
        n_w = ctx.n_w
        if gy is None:
            gy = torch.zeros_like(saved.terms.out[..., ctx.n_k:, :])
        g = chunk_step_bwd(saved, gy, g_new[:n_w], g_new[n_w:], ctx.n_k, ctx.norm, ctx.max_grad_norm)
        return (g.x, g.v, g.coef, g.eta, g.keep, None, None, None, None, *g.weights, *g.momentum)


def chunk_step(weights: Weights, momentum: Weights, x: Tensor, n_k: int, v: Tensor, coef: Tensor,
               eta: Tensor, keep: Tensor, norm: bool = False, max_grad_norm: float = 0.0
               ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Fused read + inner gradients + momentum step of one chunk. x = [keys (n_k); queries] rows.

    coef: (..., n_k) signed row weights (U = sum_i coef_i clip(g_i)); eta, keep: (..., 1, 1).
    Returns the query reads and the new weights and momentum.
    """
    out = ChunkStep.apply(x, v, coef, eta, keep, n_k, norm, float(max_grad_norm), len(weights),
                          *weights, *momentum)
    D = len(weights)
    return out[0], list(out[1:1 + D]), list(out[1 + D:])


# ----------------------------------------------------------------------------- the scan

def _band(b: int, e: int, like: Tensor) -> Tensor:
    """(b, e + b) 0/1 matrix: token t (in chunk) sums the rows j with t <= j <= t + e."""
    t = torch.arange(b, device=like.device).unsqueeze(1)
    j = torch.arange(b + e, device=like.device).unsqueeze(0)
    return ((j >= t) & (j <= t + e)).to(like.dtype)


def memory_scan(weights: Weights, momentum: Weights, q: Tensor, k: Tensor, v: Tensor, lr: Tensor,
                mom: Tensor, keep: Tensor, gamma: Tensor | None = None, *, chunk_size: int, window: int = 1,
                norm: bool = False, optimizer: str = "momentum", ns_steps: int = 5,
                max_grad_norm: float = 0.0, updates: Sequence[bool] | None = None, fused: bool = True,
                ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Fast chunk-parallel memory. See the module docstring for the exact semantics.

    ``updates[n]`` False makes complete chunk n read-only: no inner step, weights and momentum
    unchanged (test-time-learning warmup and update frequency); None = every chunk learns.

    ``fused``: each chunk's read, inner gradients and momentum are one :class:`ChunkStep` with the
    hand-written backward; under Muon the weights then move by Newton-Schulz of that momentum
    (its own hand-written backward, :mod:`..newton_schulz`), and the step's momentum-rule weights
    go unused. False computes the same forward from tensor ops and leaves the backward to
    autograd: the baseline the fused backward is checked and measured against.

    weights, momentum: lists of (..., out_i, in_i).  q: (..., L, in_1).  k: (..., L+c-1, in_1),
    v: (..., L+c-1, out_D) (the first c-1 rows are the tokens before q[0]; pad with gamma = 0).
    lr: (..., L) per-token theta.  mom, keep: (..., L // chunk_size).  gamma: (..., L+c-1) or None
    (= 1).  Returns y (..., L, out_D) and the weights and momentum after the last complete chunk.
    """
    L, e, n_chunks = check_scan_inputs(q, k, v, lr, mom, keep, gamma, chunk_size, window)
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
        # the fused step adds U = sum coef g (so it gets -coef); the unfused one subtracts g
        coefs = (-coef if fused else coef).unbind(-2)
        etas = mom[..., None, None].unbind(-3)
        keeps = keep[..., None, None].unbind(-3)
    for n in range(n_chunks):
        if updates is not None and not updates[n]:
            ys.append(memory_forward(w_cur, q_rows[..., n, :, :], norm))
            continue
        rows, c_n, eta, kp = x_rows[n], coefs[n], etas[n], keeps[n]
        if fused:
            y, w_next, s_cur = chunk_step(w_cur, s_cur, rows, e + b, v_rows[n], c_n, eta, kp, norm, max_grad_norm)
        else:
            y, grads = inner_grads(w_cur, rows, e + b, v_rows[n], c_n, norm, max_grad_norm)
            s_cur = [eta * s - g for s, g in zip(s_cur, grads)]
            w_next = [kp * w + s for w, s in zip(w_cur, s_cur)]
        ys.append(y)
        if optimizer == "muon":
            lr_n = step[..., n, None, None]
            w_cur = [kp * w + lr_n * newton_schulz(s, ns_steps) for w, s in zip(w_cur, s_cur)]
        else:
            w_cur = w_next
    if L > n_chunks * b:
        ys.append(memory_forward(w_cur, q[..., n_chunks * b:, :], norm))
    y = torch.cat(ys, dim=-2) if len(ys) > 1 else ys[0]
    return y, w_cur, s_cur
