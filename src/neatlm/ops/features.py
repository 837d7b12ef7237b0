"""Polynomial key features for the Atlas memory.

phi_p(k) = [a_1 k, a_2 (k_i k_j)_{i<=j}, a_3 (k_i k_j k_l)_{i<=j<=l}, ...] up to degree p, with
learnable coefficients a (initialised to 1/i!, the Taylor series of exp). For width d and degree 2
the feature has d + d(d+1)/2 entries.
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


def poly_features(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """x: (..., d), coeffs: (p,) -> (..., poly_feature_dim(d, p)). Gathers monomials by index."""
    d = x.shape[-1]
    parts = [coeffs[0] * x]
    for i in range(2, coeffs.shape[0] + 1):
        idx = torch.tensor(_monomials(d, i), device=x.device)  # (n_i, i)
        # index_select, not x[..., idx]: its backward is an index_add, much faster on CPU than the
        # accumulating index_put that advanced indexing differentiates into
        mono = x.index_select(-1, idx[:, 0])
        for j in range(1, i):
            mono = mono * x.index_select(-1, idx[:, j])
        parts.append(coeffs[i - 1] * mono)
    return torch.cat(parts, dim=-1)


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
