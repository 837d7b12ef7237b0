"""Quintic Newton-Schulz orthogonalisation (the update direction of the Muon optimiser).

X_0 = G / ||G||_F, then k times  X <- a X + (b A + c A^2) X  with  A = X X^T,
(a, b, c) = (3.4445, -4.7750, 2.0315); a matrix with more rows than columns is transposed first so
that A is the smaller Gram matrix. It pushes every singular value of G towards 1 (approximately
U V^T of the SVD). NS is odd: NS(-G) = -NS(G); NS(0) = 0.

The memory's Muon step runs NS on every chunk and the outer loss differentiates through it, so
the iterations are one autograd Function with the backward written out. Per step, with B = b A + c
A^2 (symmetric) and G the gradient of X' = a X + B X:

    dB = G X^T,   dA = b dB + c (dB A + A dB),   dX = a G + B G + (dA + dA^T) X

That is three batched GEMMs forward (two of them fused with their additions, ``baddbmm``) and five
backward, where autograd records about ten ops per step, each with its own temporary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def newton_schulz(g: Tensor, steps: int = 5) -> Tensor:
    """Batched quintic Newton-Schulz. g: (..., m, n) -> (..., m, n), differentiable (the iterations
    by :class:`NewtonSchulzSteps`, the normalisation by autograd)."""
    transpose = g.shape[-2] > g.shape[-1]
    x = g.transpose(-1, -2) if transpose else g
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / (norm + NS_EPS)
    if steps:
        lead = x.shape[:-2]
        x = NewtonSchulzSteps.apply(x.reshape(-1, *x.shape[-2:]), steps).view(*lead, *x.shape[-2:])
    return x.transpose(-1, -2) if transpose else x


def _ns_step(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One iteration on x (batch, m, n): (x', A, B)."""
    a, b, c = NS_COEFFS
    gram = torch.bmm(x, x.transpose(-1, -2))
    poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)       # b A + c A^2
    return torch.baddbmm(x, poly, x, beta=a), gram, poly           # a X + B X


class NewtonSchulzSteps(torch.autograd.Function):
    """``steps`` iterations on x (batch, m, n), m <= n; saves each step's input, A and B."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, steps: int) -> Tensor:
        saved = []
        for _ in range(steps):
            nxt, gram, poly = _ns_step(x)
            saved += [x, gram, poly]
            x = nxt
        ctx.save_for_backward(*saved)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        a, b, c = NS_COEFFS
        saved = ctx.saved_tensors
        for i in range(len(saved) - 3, -1, -3):
            x, gram, poly = saved[i:i + 3]
            d_poly = torch.bmm(grad, x.transpose(-1, -2))
            d_gram = torch.baddbmm(d_poly, d_poly, gram, beta=b, alpha=c)
            d_gram = torch.baddbmm(d_gram, gram, d_poly, alpha=c)
            grad = torch.baddbmm(torch.baddbmm(grad, poly, grad, beta=a), d_gram + d_gram.transpose(-1, -2), x)
        return grad, None


def newton_schulz_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """One matrix at a time, written out term by term."""
    a, b, c = NS_COEFFS
    flat = g.reshape(-1, g.shape[-2], g.shape[-1])
    out = []
    for mat in flat:
        x = mat.T if mat.shape[0] > mat.shape[1] else mat
        x = x / (torch.sqrt((x * x).sum()) + NS_EPS)
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * (gram @ gram)) @ x
        out.append(x.T if mat.shape[0] > mat.shape[1] else x)
    return torch.stack(out).reshape(g.shape)
