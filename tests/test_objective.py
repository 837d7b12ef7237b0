"""The step objective: one object weighs every segment's loss."""

import pytest
import torch

from neatlm.train.objective import StepObjective


def test_segment_terms_add_up_to_the_mean_of_window_means():
    obj = StepObjective(micro_batches=2, segments=3)
    gen = torch.Generator().manual_seed(0)
    sums = torch.rand(2, 3, generator=gen, dtype=torch.float64)  # summed token loss per segment
    scored = [30, 12]                                             # scored tokens per window
    aux = torch.rand(2, 3, generator=gen, dtype=torch.float64)
    total = sum(obj.term(sums[m, s], scored[m], aux[m, s]) for m in range(2) for s in range(3))
    want = sum(sums[m].sum() / scored[m] for m in range(2)) / 2 + aux.mean()
    assert total.item() == pytest.approx(want.item(), rel=1e-12)
    assert obj.backwards == 6
    assert obj.mean_loss(sums.sum(), 42).item() == pytest.approx(sums.sum().item() / 42)


def test_a_single_backward_is_the_plain_mean():
    obj = StepObjective(1, 1)
    loss_sum = torch.tensor(6.0)
    assert obj.term(loss_sum, 3).item() == 2.0
    with pytest.raises(ValueError, match="must be >= 1"):
        StepObjective(0, 1)
