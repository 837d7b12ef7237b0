"""MoE: a sparse top-k mixture of SwiGLU experts, usable as the channel mixer of a block.

``y, aux_loss = MoE(dim, hidden, experts, top_k)(x)`` with ``x``, ``y`` of shape (B, T, D). Each
token runs through its ``top_k`` experts only (tokens sorted by expert once, one matmul chain per
expert on a contiguous slice; see :mod:`neatlm.ops.moe_dispatch`). ``aux_loss`` is
``aux_loss_weight * balance_loss`` (a scalar in the graph, ready to add to the training loss), where
``balance_loss`` is the unweighted Switch load-balancing loss (1.0 when perfectly balanced);
:meth:`MoE.run` returns both and the number of assignments the capacity dropped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..ops.moe_dispatch import (capacity_for, experts_swiglu, load_balance_loss, make_dispatch,
                                moe_dense_reference, route_topk)


class MoEOutput(NamedTuple):
    y: Tensor               # (B, T, D)
    balance_loss: Tensor    # unweighted load-balancing loss, in the graph
    dropped: int            # assignments dropped by the capacity


class MoE(nn.Module):
    """Sparse top-k mixture of SwiGLU experts: (B, T, D) -> (B, T, D).

    Args:
        dim: model width D.
        hidden: hidden width of each SwiGLU expert.
        experts: number of experts E.
        top_k: experts per token (1 or 2 in practice; any k <= E works).
        capacity_factor: 0 = no cap; otherwise each expert takes at most
            ``ceil(capacity_factor * N top_k / E)`` assignments per forward, in token order, and
            the dropped ones contribute zero.
        aux_loss_weight: scale of the load-balancing loss returned as ``aux_loss``.
        init_std: std of the normal init of router and experts; ``w_down`` gets ``init_std * out_scale``.
    """

    def __init__(self, dim: int, hidden: int, experts: int = 4, top_k: int = 2, capacity_factor: float = 0.0,
                 aux_loss_weight: float = 0.01, init_std: float = 0.02, out_scale: float = 1.0):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k={top_k}: must be between 1 and experts={experts}")
        self.dim, self.hidden, self.experts, self.top_k = dim, hidden, experts, top_k
        self.capacity_factor, self.aux_loss_weight = float(capacity_factor), float(aux_loss_weight)
        self.init_std, self.out_scale = float(init_std), float(out_scale)
        self.router = nn.Linear(dim, experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(experts, dim, hidden))
        self.w_up = nn.Parameter(torch.empty(experts, dim, hidden))
        self.w_down = nn.Parameter(torch.empty(experts, hidden, dim))
        self.reset_parameters()

    @classmethod
    def from_config(cls, dim: int, hidden: int, cfg: Any, init_std: float = 0.02, out_scale: float = 1.0) -> "MoE":
        """Build from a :class:`neatlm.config.MoEConfig` (``init_std``/``out_scale`` as in the model)."""
        return cls(dim, hidden, experts=cfg.experts, top_k=cfg.top_k, capacity_factor=cfg.capacity_factor,
                   aux_loss_weight=cfg.aux_loss_weight, init_std=init_std, out_scale=out_scale)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self.init_std)
        nn.init.normal_(self.w_gate, std=self.init_std)
        nn.init.normal_(self.w_up, std=self.init_std)
        nn.init.normal_(self.w_down, std=self.init_std * self.out_scale)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, aux_loss): the channel-mixer protocol of a block."""
        out = self.run(x)
        return out.y, self.aux_loss_weight * out.balance_loss

    def run(self, x: Tensor) -> MoEOutput:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        probs, experts, gates = route_topk(self.router(flat), self.top_k)
        cap = capacity_for(B * T, self.top_k, self.experts, self.capacity_factor)
        dispatch = make_dispatch(experts, self.experts, cap)
        sorted_gates = gates.reshape(-1)[dispatch.assignment]
        y = experts_swiglu(flat, sorted_gates, dispatch, self.w_gate, self.w_up, self.w_down)
        dropped = flat.shape[0] * self.top_k - dispatch.token.numel()
        return MoEOutput(y.reshape(B, T, D), load_balance_loss(probs, dispatch.load), dropped)

    def dense_reference(self, x: Tensor) -> Tensor:
        """Every expert on every token, unselected ones masked: equals ``forward(x)[0]`` (for tests)."""
        B, T, D = x.shape
        y = moe_dense_reference(x.reshape(B * T, D), self.router.weight, self.w_gate, self.w_up, self.w_down,
                                self.top_k, self.capacity_factor)
        return y.reshape(B, T, D)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, experts={self.experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}")

