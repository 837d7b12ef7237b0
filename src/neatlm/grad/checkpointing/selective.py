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


def selective_contexts(save_ops: Iterable, observe: Callable[[Any], None] | None = None):
    """The ``context_fn`` result for one checkpointed call: MUST_SAVE for ``save_ops``, PREFER_RECOMPUTE
    otherwise. ``observe`` is handed each kept output (the cache is invisible to saved-tensor hooks,
    so measuring counts it from here)."""
    save = frozenset(save_ops)

    def policy(ctx, op, *args, **kwargs):
        if op in save:
            if observe is not None and not ctx.is_recompute:
                observe(ctx.op_output)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
