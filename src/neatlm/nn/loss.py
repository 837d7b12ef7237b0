"""How predictions are scored: the one ignore marker, the language-model loss, arg-max hits.

Every task writes its targets with :data:`IGNORE_INDEX` at the positions that are not scored
(MQAR scores only its queries; text scores every position), and everything that scores
predictions (training, validation, the gradient checker) reads them through these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # a target position that is not scored (torch's cross_entropy default)


def lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy in nats; ``targets`` are the inputs shifted by one, and
    positions marked :data:`IGNORE_INDEX` are not scored.

    Half-precision logits are upcast to fp32 for the softmax; fp32 and fp64 stay as they are
    (the float64 gradient checker depends on it).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction)


def scored_count(targets: Tensor) -> int:
    """Positions of ``targets`` that are scored."""
    return int((targets != IGNORE_INDEX).sum())


def argmax_correct(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(right, scored): boolean masks of the shape of ``targets``; ``right`` is True where a scored
    position's arg-max prediction is its target. Every accuracy is built from these two."""
    scored = targets != IGNORE_INDEX
    return (logits.argmax(-1) == targets) & scored, scored


def argmax_hits(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(scored positions predicted right, scored positions): the query accuracy of MQAR is their
    ratio, summed over batches."""
    right, scored = argmax_correct(logits, targets)
    return int(right.sum()), int(scored.sum())
