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
    plus the mean of the auxiliary losses (e.g. MoE balance) over all segments.

    A segment contributes ``loss_sum / (scored * micro_batches) + aux / backwards``, where
    ``loss_sum`` is its summed token loss and ``scored`` the scored tokens of its whole window;
    these terms, one backward pass each, add up to the step objective.
    """

    micro_batches: int
    segments: int

    def __post_init__(self) -> None:
        if self.micro_batches < 1 or self.segments < 1:
            raise ValueError(f"StepObjective: micro_batches = {self.micro_batches} and segments = "
                             f"{self.segments} must be >= 1")

    @property
    def backwards(self) -> int:
        """Backward passes per optimizer step."""
        return self.micro_batches * self.segments

    def term(self, loss_sum: Tensor, scored: int, aux: Tensor | None = None) -> Tensor:
        """What one segment backpropagates (``scored``: scored tokens of its whole window)."""
        objective = loss_sum * self.segments / max(scored, 1)
        if aux is not None:
            objective = objective + aux
        n = self.backwards
        return objective / n if n != 1 else objective

    @staticmethod
    def mean_loss(loss_sum: Tensor, scored: int) -> Tensor:
        """The logged loss of a step: summed token losses over all its scored tokens."""
        return loss_sum / max(scored, 1)
