"""The training objective of one optimizer step, as the sum of its backward passes.

A step draws ``micro_batches`` windows (gradient accumulation); each window runs as ``segments``
consecutive segments (truncated backprop: state is carried and detached between them), and each
segment has its own backward pass. :class:`StepObjective` is the one place that knows this
layout: how much each segment's loss weighs and how the logged loss is averaged. (Under torchrun
the coordinator averages the gradients over processes once per step, in ``step()``, however many
backward passes came before: nothing here depends on which backward is the last.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class StepObjective:
    """The step objective is the mean over micro-batches of each window's loss per scored token,
    plus the mean of the auxiliary losses (e.g. MoE balance) over all backward passes.

    A segment contributes ``loss_sum / (scored * micro_batches) + aux / backwards``, where
    ``loss_sum`` is its summed token loss and ``scored`` the scored tokens of its whole window
    (every piece of it); these terms, one backward pass each, add up to the step objective.

    ``splits``: the pieces each window's rows run as (1; more after an out-of-memory fallback).
    The language-model part does not depend on it: a piece's tokens weigh what they weighed in the
    whole window, so splitting a window changes its gradient only by float summation order, even
    when its rows have different numbers of scored tokens. The auxiliary losses are statistics of
    the rows of one forward (a balance loss over a piece is not the balance loss over the window),
    so they can only be averaged over the backward passes there are.
    """

    micro_batches: int
    segments: int
    splits: int = 1

    def __post_init__(self) -> None:
        if self.micro_batches < 1 or self.segments < 1 or self.splits < 1:
            raise ValueError(f"StepObjective: micro_batches = {self.micro_batches}, segments = "
                             f"{self.segments} and splits = {self.splits} must be >= 1")

    @property
    def backwards(self) -> int:
        """Backward passes per optimizer step."""
        return self.micro_batches * self.splits * self.segments

    def term(self, loss_sum: Tensor, scored: int, aux: Tensor | None = None) -> Tensor:
        """What one segment of one piece backpropagates (``scored``: scored tokens of its whole
        window, every piece of it)."""
        objective = loss_sum * (self.segments * self.splits) / max(scored, 1)
        if aux is not None:
            objective = objective + aux
        n = self.backwards
        return objective / n if n != 1 else objective

    @staticmethod
    def mean_loss(loss_sum: Tensor, scored: int) -> Tensor:
        """The logged loss of a step: summed token losses over all its scored tokens."""
        return loss_sum / max(scored, 1)
