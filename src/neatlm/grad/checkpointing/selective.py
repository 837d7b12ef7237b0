"""Torch's selective activation checkpointing, for units without a fused counterpart.

Inside a region the outputs of :data:`SAVE_OPS` (matmuls, attention kernels, convolution: the
ops that are expensive to run again) are kept, and every other op is replayed from them in
backward. Torch implements this by running every op of the region through a Python dispatch
mode, forward and backward, which is why the fused modules (:mod:`.fused`) are preferred where
they exist.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _ops(*names: str) -> frozenset:
    """The aten overloads of these names that this build of torch has."""
    out = []
    for n in names:
        packet, _, overload = n.partition(".")
        op = getattr(torch.ops.aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            out.append(getattr(op, overload or "default"))
    return frozenset(out)


#: outputs kept by ``"selective"``: matmuls and attention kernels (expensive to recompute)
SAVE_OPS = _ops(
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",
)


class SelectiveBackwardError(RuntimeError):
    """A second backward pass reached a region whose selective cache the first one consumed."""


class _Region:
    """One checkpointed call: whether its forward cached outputs and whether backward replayed it."""

    def __init__(self, where: str):
        self.where = where
        self.cached = False
        self.replayed = False


class _ReplayOnce:
    """Torch's recompute context for one region, refusing a second replay once the cache is used up.

    Torch hands each cached output to the first replay only; a second backward through the
    region (per-component losses run one each) could not be answered. Saying so here, where the
    cause is known, gives the user the fix instead of torch's generic message.
    """

    def __init__(self, mode: Any, region: _Region):
        self.mode, self.region = mode, region

    def __enter__(self):
        r = self.region
        if r.replayed and r.cached:
            raise SelectiveBackwardError(
                f"checkpointing: a second backward pass reached {r.where or 'a unit'} under torch's selective "
                "checkpointing, which keeps its cached outputs for one backward only (per-component losses run "
                "one backward per component); use the 'full' or 'none' policy for the units these losses share")
        r.replayed = True
        return self.mode.__enter__()

    def __exit__(self, *exc: Any):
        return self.mode.__exit__(*exc)


def selective_contexts(save_ops: Iterable, observe: Callable[[Any], None] | None = None, where: str = ""):
    """The ``context_fn`` result for one checkpointed call: MUST_SAVE for ``save_ops``, PREFER_RECOMPUTE
    otherwise. ``observe`` is handed each kept output (the cache is invisible to saved-tensor hooks,
    so measuring counts it from here); ``where`` names the unit in errors."""
    save = frozenset(save_ops)
    region = _Region(where)

    def policy(ctx, op, *args, **kwargs):
        if op in save:
            if not ctx.is_recompute:
                region.cached = True
                if observe is not None:
                    observe(ctx.op_output)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    forward, replay = create_selective_checkpoint_contexts(policy)
    return forward, _ReplayOnce(replay, region)
