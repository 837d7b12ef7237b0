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


def test_a_window_split_into_pieces_weighs_its_tokens_as_the_whole_window():
    """After an out-of-memory fallback a window runs as pieces: the language-model part of the
    objective is unchanged even when the pieces have different numbers of scored tokens; the
    auxiliary losses are averaged over all backward passes."""
    whole, split = StepObjective(2, 3), StepObjective(2, 3, splits=2)
    assert split.backwards == 12
    gen = torch.Generator().manual_seed(1)
    pieces = torch.rand(2, 2, 3, generator=gen, dtype=torch.float64)   # window, piece, segment
    scored = [30, 12]
    want = sum(whole.term(pieces[m, :, s].sum(), scored[m]) for m in range(2) for s in range(3))
    got = sum(split.term(pieces[m, p, s], scored[m]) for m in range(2) for p in range(2) for s in range(3))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    aux = torch.rand(2, 2, 3, generator=gen, dtype=torch.float64)
    got_aux = sum(split.term(torch.zeros((), dtype=torch.float64), 1, aux[m, p, s])
                  for m in range(2) for p in range(2) for s in range(3))
    assert got_aux.item() == pytest.approx(aux.mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match="splits = 0 must be >= 1"):
        StepObjective(1, 1, splits=0)
