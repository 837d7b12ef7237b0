"""Sparse top-k mixture-of-experts dispatch: route, sort tokens by expert once, grouped matmuls.

Shapes: ``N`` tokens (flattened batch x time), ``D`` model width, ``E`` experts, ``H`` expert
hidden width, ``k`` experts per token, ``M <= N k`` kept (token, expert) assignments.

Routing (``docs/moe.md``): ``h = x W_r``; ``S = topk(h, k)``; the gates are
``softmax(h_S)`` for ``k >= 2`` (renormalised over the chosen experts) and, for ``k = 1``, the
full-softmax probability of the chosen expert (Switch Transformer; ``softmax(h_S)`` would be the
constant 1 and the router would learn from the auxiliary loss only).

Dispatch: the ``N k`` assignments are stably sorted by expert once; a capacity (if any) keeps the
first ``capacity`` assignments of each expert in token order and drops the rest (a dropped
assignment contributes zero; the block's residual carries the token). Each expert runs one SwiGLU
``(silu(x W_g) * (x W_u)) W_d`` on its contiguous slice of the sorted tokens. The same
permutation scatters the results back (forward) and gathers the output gradient (backward).

The expert computation ``experts_swiglu`` is plain autograd over the sparse dispatch: it saves
the hidden activations, so its backward recomputes nothing. Trading that memory for a second pass
of the expert matmuls is the job of the activation-checkpointing policies in
:mod:`neatlm.grad.checkpointing`, which apply to every layer alike. ``moe_dense_reference`` runs
every expert on every token and masks the unselected ones: a check for tests and the dense
baseline of the benchmark.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Dispatch(NamedTuple):
    token: Tensor        # (M,) long: token of each kept assignment, sorted by expert
    assignment: Tensor   # (M,) long: index into the flat (N k) assignment list (token * k + j)
    counts: list[int]    # kept assignments per expert (length E); slices of the sorted order
    load: Tensor         # (E,) float: fraction of the N k assignments routed to each expert, before capacity


def route_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """logits (N, E) -> probs (N, E) full softmax (>= float32), experts (N, k) long, gates (N, k)."""
    # softmax in at least float32 (half-precision logits are upcast; float64 stays float64)
    dt = torch.promote_types(logits.dtype, torch.float32)
    probs = logits.softmax(-1, dtype=dt)
    top, experts = logits.topk(k, dim=-1)
    gates = probs.gather(-1, experts) if k == 1 else top.softmax(-1, dtype=dt)
    return probs, experts, gates


def capacity_for(n_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int | None:
    """Assignments an expert may take: ``ceil(capacity_factor * N k / E)``; None = unlimited."""
    if capacity_factor <= 0:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * k / num_experts))


def make_dispatch(experts: Tensor, num_experts: int, capacity: int | None = None) -> Dispatch:
    """experts (N, k) long -> the expert-sorted order of the assignments (one stable sort)."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices                    # by expert, then token order
    counts_t = torch.bincount(flat, minlength=num_experts)
    load = counts_t.to(torch.float32) / max(1, flat.numel())
    if capacity is not None:
        start = torch.cumsum(counts_t, 0) - counts_t                   # first sorted slot of each expert
        rank = torch.arange(order.numel(), device=flat.device) - start[flat[order]]
        order = order[rank < capacity]
        counts_t = counts_t.clamp(max=capacity)
    return Dispatch(token=order // k, assignment=order, counts=counts_t.tolist(), load=load)


def load_balance_loss(probs: Tensor, load: Tensor) -> Tensor:
    """Switch-style ``E * sum_e f_e P_e``; 1 at a perfectly uniform router. probs (N, E), load (E,)."""
    num_experts = probs.shape[-1]
    return num_experts * (load.to(probs.dtype) * probs.mean(0)).sum()


def _swiglu(xs: Tensor, wg: Tensor, wu: Tensor, wd: Tensor) -> Tensor:
    dt = xs.dtype
    return (F.silu(xs @ wg.to(dt)) * (xs @ wu.to(dt))) @ wd.to(dt)


def experts_swiglu(x: Tensor, gates: Tensor, dispatch: Dispatch, w_gate: Tensor, w_up: Tensor,
                   w_down: Tensor) -> Tensor:
    """Sparse experts, plain autograd. x (N, D), gates (M,) in sorted order -> (N, D)."""
    xs = x[dispatch.token]                                     # gather once, in expert order
    parts = []
    start = 0
    for e, cnt in enumerate(dispatch.counts):
        if cnt:
            parts.append(_swiglu(xs[start:start + cnt], w_gate[e], w_up[e], w_down[e]))
        start += cnt
    ys = torch.cat(parts) if parts else xs.new_zeros(0, x.shape[-1])
    ys = ys * gates.to(x.dtype)[:, None]
    return x.new_zeros(x.shape).index_add(0, dispatch.token, ys)   # scatter back with the same permutation


def moe_dense_reference(x: Tensor, router_weight: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                        top_k: int, capacity_factor: float = 0.0) -> Tensor:
    """Every expert on every token, unselected (or dropped) experts masked to zero. x (N, D) -> (N, D).

    The capacity rule is re-implemented with a plain loop (first come, first served in token order).
    """
    n, num_experts = x.shape[0], w_gate.shape[0]
    logits = x @ router_weight.T
    _, experts, gates = route_topk(logits, top_k)
    cap = capacity_for(n, top_k, num_experts, capacity_factor)
    keep = torch.ones(n, top_k, dtype=torch.bool)
    if cap is not None:
        taken = [0] * num_experts
        for t, row in enumerate(experts.tolist()):
            for j, e in enumerate(row):
                keep[t, j] = taken[e] < cap
                taken[e] += 1
    keep = keep.to(x.device)
    combine = torch.zeros(n, num_experts, dtype=x.dtype, device=x.device)
    combine = combine.scatter_add(1, experts, torch.where(keep, gates.to(x.dtype), 0.0))
    y = torch.zeros_like(x)
    for e in range(num_experts):
        y = y + combine[:, e, None] * _swiglu(x, w_gate[e], w_up[e], w_down[e])
    return y
