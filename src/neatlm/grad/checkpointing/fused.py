"""Fused counterparts that the ``"selective"`` policy swaps in for a block and for a SwiGLU.

For a :class:`~neatlm.nn.model.Block` whose MLP is SwiGLU, :class:`FusedBlock` runs norm1 as
:func:`~neatlm.ops.recompute.rms_norm` and norm2 + MLP as one
:func:`~neatlm.ops.recompute.rms_norm_swiglu`; for a bare SwiGLU, :class:`FusedSwiGLU` runs
``rms_norm_swiglu`` without the norm. Those ops keep x, 1/rms and the gate_up output and rebuild
the pointwise intermediates in backward: selective checkpointing without replaying the forward
and without torch's dispatch mode. The block's mixer keeps its activations as it would.

A fused module takes the original's place in its parent and registers the original's children
under the same names, so parameters (the same objects), their names and state dicts do not
change. The original is kept aside, not as a child, and goes back when the policy is removed;
the original classes keep one code path each.

:func:`fused_ok` is the one place that decides between the fused ops and the original module:
the fused ops are written for fp32/fp64 and do no casting, so under autocast or in half
precision the original runs under torch's selective checkpointing instead; without grad there
is nothing to save and the original runs as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...nn.memory import TTLControl
from ...nn.model import Block, SwiGLU
from ...ops.recompute import rms_norm, rms_norm_swiglu


def fused_ok(x: Tensor) -> bool:
    """Whether a fused module may run its fused ops on input ``x`` (see the module docstring)."""
    return (torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type))


def _eps(norm: nn.RMSNorm, x: Tensor) -> float:
    """The epsilon ``norm`` would use on ``x`` (nn.RMSNorm's default is the dtype's)."""
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps


class FusedModule(nn.Module):
    """A module that stands in for ``original`` with the same children, fused where :func:`fused_ok`."""

    def __init__(self, original: nn.Module, fallback: Any):
        super().__init__()
        # only children can be shared: a tensor held directly would be replaced on one side by .to()
        if any(True for _ in original.parameters(recurse=False)) or any(True for _ in original.buffers(recurse=False)):
            raise ValueError(f"checkpointing: {type(original).__name__} holds tensors directly; it cannot be swapped")
        for name, child in original.named_children():
            self.add_module(name, child)
        self.__dict__["original"] = original   # aside, not a child: its children are already ours
        self.run = fallback                     # torch's selective checkpointing over the original
        self.training = original.training

    def train(self, mode: bool = True) -> "FusedModule":
        super().train(mode)
        self.original.training = mode   # the children are shared; the original's own flag too
        return self

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if fused_ok(x):
            return self.fused_forward(x, *args, **kwargs)
        return self.run(self.original, x, *args, **kwargs)

    def fused_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class FusedBlock(FusedModule):
    """A :class:`~neatlm.nn.model.Block` with a SwiGLU MLP: ``(x, state, aux)`` as the block returns."""

    def fused_forward(self, x: Tensor, state: Any = None, ttl: TTLControl = TTLControl()) -> tuple[Tensor, Any, None]:
        y, state = self.mixer(rms_norm(x, self.norm1.weight, _eps(self.norm1, x)), state, ttl)
        x = x + y
        w_gu, w_down = self.mlp.gate_up.weight, self.mlp.down.weight
        return x + rms_norm_swiglu(x, self.norm2.weight, w_gu, w_down, _eps(self.norm2, x)), state, None


class FusedSwiGLU(FusedModule):
    """A :class:`~neatlm.nn.model.SwiGLU`: ``(y, None)`` as the MLP returns."""

    def fused_forward(self, x: Tensor) -> tuple[Tensor, None]:
        return rms_norm_swiglu(x, None, self.gate_up.weight, self.down.weight, None), None


def fused_counterpart(module: nn.Module) -> type[FusedModule] | None:
    """The fused class that can stand in for ``module`` under ``"selective"``, if any.

    Exact types only: a subclass may compute something else in its forward.
    """
    if type(module) is Block and type(module.mlp) is SwiGLU:
        return FusedBlock
    if type(module) is SwiGLU:
        return FusedSwiGLU
    return None
