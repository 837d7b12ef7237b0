"""Fused ops whose backward recomputes the pointwise intermediates (selective checkpointing).

:func:`rms_norm_swiglu` computes ``out = down(silu(g) * u)`` with ``(g, u) = gate_up(rmsnorm(x))``.
Autograd would keep, per token, the normalised input (D floats, for gate_up's weight gradient),
its own copy of x / rms, g and u (2H), silu(g) (H, for the product's gradient) and the product
(H, for down's weight gradient). The fused op keeps only x, the per-token 1/rms and the gate_up
output (D + 1 + 2H) and rebuilds the rest in backward with pointwise ops; no matmul is
recomputed. With the default H = 8/3 D that is half the MLP's activation memory for a few
pointwise passes. :func:`rms_norm` keeps x and 1/rms instead of autograd's extra normalised copy.

This is what the ``"selective"`` checkpoint policy runs in a block (the fused modules of
:mod:`neatlm.grad.checkpointing.fused`): torch's generic selective checkpointing reaches a
similar saving but replays every op of the region under a Python dispatch mode, forward and
backward, where these rebuild only the pointwise intermediates and replay no matmul.

Both are first-order only (``once_differentiable``: a double backward raises instead of
silently treating the rebuilt intermediates as constants). The ``*_reference`` functions are the
same computations in plain autograd; tests check that they agree and run a float64 gradcheck on
the fused ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _rstd(x: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm_backward(dn: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(dx, dweight) of n = xhat * weight, xhat = x * rstd, rstd = 1 / rms(x), all over the last dim."""
    d_weight = (dn * xhat).reshape(-1, dn.shape[-1]).sum(0) if weight is not None else None
    dxhat = dn * weight if weight is not None else dn
    return rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True)), d_weight


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        rstd = _rstd(x, eps)
        ctx.save_for_backward(x, rstd, weight)
        n = x * rstd
        return n * weight if weight is not None else n

    @staticmethod
    @once_differentiable
    def backward(ctx, dn: Tensor):
        x, rstd, weight = ctx.saved_tensors
        dx, d_weight = _rms_norm_backward(dn, x * rstd, rstd, weight)
        return dx, d_weight, None


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim keeping only x and 1/rms for backward (autograd's keeps x / rms too)."""
    return _RMSNorm.apply(x, weight, eps)


def rms_norm_reference(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    n = x * _rstd(x, eps)
    return n * weight if weight is not None else n


class _RMSNormSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Tensor | None, w_gate_up: Tensor, w_down: Tensor,
                eps: float | None) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rstd = _rstd(x2, eps) if eps is not None else None
        n = x2 if rstd is None else x2 * rstd
        if norm_weight is not None:
            n = n * norm_weight
        gu = n @ w_gate_up.t()
        g, u = gu.chunk(2, dim=-1)
        h = (F.silu(g) * u).view(*shape[:-1], g.shape[-1])
        out = h @ w_down.t()   # made from a fresh (..., H) tensor: not a view, may be modified in place
        ctx.save_for_backward(x2, rstd, gu, norm_weight, w_gate_up, w_down)
        ctx.has_weight, ctx.has_norm = norm_weight is not None, rstd is not None
        ctx.shape = shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x2, rstd, gu, norm_weight, w_gate_up, w_down = ctx.saved_tensors
        dout = grad_out.reshape(-1, grad_out.shape[-1])
        # rebuild the pointwise intermediates from what was kept
        xhat = x2 * rstd if ctx.has_norm else x2
        n = xhat * norm_weight if ctx.has_weight else xhat
        g, u = gu.chunk(2, dim=-1)
        sig = torch.sigmoid(g)
        s = g * sig
        h = s * u
        # down projection, product, silu
        d_w_down = dout.t() @ h
        dh = dout @ w_down
        du = dh * s
        dg = dh * u * (sig * (1 + g * (1 - sig)))
        dgu = torch.cat((dg, du), dim=-1)
        # gate_up projection, then RMSNorm
        d_w_gate_up = dgu.t() @ n
        dn = dgu @ w_gate_up
        dx, d_norm_weight = _rms_norm_backward(dn, xhat, rstd, norm_weight) if ctx.has_norm else (dn, None)
        return dx.view(ctx.shape), d_norm_weight, d_w_gate_up, d_w_down, None


def rms_norm_swiglu(x: Tensor, norm_weight: Tensor | None, w_gate_up: Tensor, w_down: Tensor,
                    eps: float | None) -> Tensor:
    """down(silu(g) * u) with (g, u) = (rmsnorm(x) * norm_weight) @ w_gate_up^T split in halves.

    x: (..., D); norm_weight: (D,) or None (no scale); eps: the norm's epsilon, or None for no
    RMSNorm at all (a bare SwiGLU, then norm_weight must be None); w_gate_up: (2H, D); w_down:
    (D_out, H). Keeps x, 1/rms and the gate_up output for backward and recomputes the pointwise
    ops there.
    """
    if eps is None and norm_weight is not None:
        raise ValueError("rms_norm_swiglu: norm_weight without a norm (eps=None)")
    return _RMSNormSwiGLU.apply(x, norm_weight, w_gate_up, w_down, eps)


def rms_norm_swiglu_reference(x: Tensor, norm_weight: Tensor | None, w_gate_up: Tensor, w_down: Tensor,
                              eps: float | None) -> Tensor:
    """The same function in plain autograd (keeps every intermediate autograd needs)."""
    n = x if eps is None else rms_norm_reference(x, norm_weight, eps)
    g, u = (n @ w_gate_up.t()).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w_down.t()
