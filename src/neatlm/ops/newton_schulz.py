"""Quintic Newton-Schulz orthogonalisation (the update direction of the Muon optimiser).

X_0 = G / ||G||_F, then k times  X <- a X + (b A + c A^2) X  with  A = X X^T,
(a, b, c) = (3.4445, -4.7750, 2.0315); a matrix with more rows than columns is transposed first so
that A is the smaller Gram matrix. It pushes every singular value of G towards 1 (approximately
U V^T of the SVD). NS is odd: NS(-G) = -NS(G); NS(0) = 0.
"""

from __future__ import annotations

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Batched quintic Newton-Schulz. g: (..., m, n) -> (..., m, n), differentiable."""
    a, b, c = NS_COEFFS
    transpose = g.shape[-2] > g.shape[-1]
    x = g.transpose(-1, -2) if transpose else g
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / (norm + NS_EPS)
    for _ in range(steps):
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.transpose(-1, -2) if transpose else x


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
