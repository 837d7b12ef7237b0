"""What the chunk-parallel path and the token-loop reference share: the LayerNorm epsilon, the
weight-list type and the argument checks (so that both reject the same malformed calls)."""

from __future__ import annotations

from typing import Sequence

import torch

LN_EPS = 1e-5

Weights = Sequence[torch.Tensor]


def check_scan_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                      mom: torch.Tensor, keep: torch.Tensor, gamma: torch.Tensor | None,
                      chunk_size: int, window: int) -> tuple[int, int, int]:
    """Validate the row counts of a scan's inputs; returns (L, e = window - 1, complete chunks)."""
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
