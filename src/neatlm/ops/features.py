"""Polynomial key features for the Atlas memory.

phi_p(k) = [a_1 k, a_2 (k_i k_j)_{i<=j}, a_3 (k_i k_j k_l)_{i<=j<=l}, ...] up to degree p, with
learnable coefficients a (initialised to 1/i!, the Taylor series of exp). For width d and degree 2
the feature has d + d(d+1)/2 entries.

The fast path computes every monomial as a product of ``degree`` selections, each a matmul with a
constant 0/1 matrix: factor j of feature f is x @ S_j, where column f of S_j picks the monomial's
j-th index, or is zero with an added 1 where the monomial has fewer than j factors. With the
coefficients folded into S_1, for degree 2

    phi(x) = (x @ (S_1 * a)) * (x @ S_2 + beta)

so the forward is two small GEMMs and one product, and the backward GEMMs with the transposed
selections. Gathering columns by index instead (``index_select``) differentiates into a scatter
(``index_add``) and needs a concatenation of the degree blocks: on CPU, at 32-wide heads, the map
alone took about 1.5x as long forward and backward, and a training step with it 1.2x
(``benchmarks/memory_variants.py``, poly).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _monomials(d: int, degree: int) -> tuple[tuple[int, ...], ...]:
    return tuple(itertools.combinations_with_replacement(range(d), degree))


def poly_feature_dim(d: int, degree: int) -> int:
    """Width of phi_p for input width d: sum over i=1..p of C(d + i - 1, i)."""
    return sum(math.comb(d + i - 1, i) for i in range(1, degree + 1))


def poly_init_coeffs(degree: int) -> torch.Tensor:
    """(degree,) coefficients 1/i! for i = 1..degree."""
    return torch.tensor([1.0 / math.factorial(i) for i in range(1, degree + 1)])


@lru_cache(maxsize=64)
def _selections(d: int, degree: int, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The constant pieces of the fast path, for F = poly_feature_dim(d, degree) features:
    select (degree, d, F) 0/1 matrices S_j; pad (degree, F): 1 where factor j is absent (the
    monomial has fewer than j + 1 factors), else 0; order (F,): each feature's degree - 1."""
    monomials = [m for i in range(1, degree + 1) for m in _monomials(d, i)]
    select = torch.zeros(degree, d, len(monomials), dtype=dtype)
    pad = torch.zeros(degree, len(monomials), dtype=dtype)
    for f, mono in enumerate(monomials):
        for j in range(degree):
            if j < len(mono):
                select[j, mono[j], f] = 1.0
            else:
                pad[j, f] = 1.0
    order = torch.tensor([len(m) - 1 for m in monomials])
    return select.to(device), pad.to(device), order.to(device)


def poly_features(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """x: (..., d), coeffs: (p,) -> (..., poly_feature_dim(d, p)), as the product of p selection
    GEMMs (module docstring); the columns are ordered as :func:`poly_features_reference`'s."""
    select, pad, order = _selections(x.shape[-1], coeffs.shape[0], x.device, x.dtype)
    out = x @ (select[0] * coeffs.index_select(0, order))   # factor 1, with each feature's coefficient
    for j in range(1, coeffs.shape[0]):
        out = out * torch.addmm(pad[j], x.reshape(-1, x.shape[-1]), select[j]).view_as(out)
    return out


def poly_features_reference(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """One monomial at a time."""
    d = x.shape[-1]
    cols = []
    for i in range(1, coeffs.shape[0] + 1):
        for combo in itertools.combinations_with_replacement(range(d), i):
            m = torch.ones_like(x[..., 0])
            for j in combo:
                m = m * x[..., j]
            cols.append(coeffs[i - 1] * m)
    return torch.stack(cols, dim=-1)
