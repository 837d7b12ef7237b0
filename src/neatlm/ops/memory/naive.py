"""Token-loop references for the test-time memory: one token at a time, inner gradients by
autograd. Slow on purpose: they share no formula with :mod:`.chunk` (only the argument checks),
so agreement between the two checks the analytic inner gradients and the chunk-parallel
bookkeeping. The semantics they spell out are derived in ``docs/memory.md``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..newton_schulz import newton_schulz_reference
from .common import LN_EPS, Weights, check_scan_inputs


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


def token_grad_reference(weights: Weights, k_t: torch.Tensor, v_t: torch.Tensor, norm: bool,
                         max_grad_norm: float) -> list[torch.Tensor]:
    """grad_W ||M_W(k_t) - v_t||^2 by autograd (independent of the analytic formulas), clipped to
    Frobenius norm <= max_grad_norm (0 = no clipping). Built with create_graph so that outer
    gradients flow through it; under no_grad (evaluation, generation) there is no outer graph, and
    the gradient is taken at detached copies: a view made under no_grad of a tensor that requires
    grad (W0 expanded to the batch) says ``requires_grad`` but is no node of any graph."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        ws = [w if w.requires_grad and outer else w.detach().requires_grad_(True) for w in weights]
        loss = ((memory_forward_reference(ws, k_t, norm) - v_t) ** 2).sum()
        grads = list(torch.autograd.grad(loss, ws, create_graph=outer))
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
    """Token loop with the semantics of :func:`neatlm.ops.memory.memory_scan` (same arguments,
    less its implementation switch ``fused``, and the same results)."""
    L, e, n_chunks = check_scan_inputs(q, k, v, lr, mom, keep, gamma, chunk_size, window)
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
            g_i = token_grad_reference(w_start, k[..., i + e, :], v[..., i + e, :], norm, max_grad_norm)
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
