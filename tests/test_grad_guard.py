"""NaN/Inf guard: skip, exact rollback, lr cut, event, continue; K failures in a row stop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neatlm.grad.components import parse_components
from neatlm.grad.coordinator import GradientCoordinator
from neatlm.grad.guard import GuardConfig, TrainingDiverged

from test_grad_coordinator import SPECS, data, lm, make

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(ps):
    return [p.detach().clone() for p in ps]


def train_step(coord, model, seed, poison=None):
    x, y = data(seed=seed)
    coord.backward(lm(model, x, y))
    if poison is not None:
        coord.params(poison)[0].grad[0, 0] = float("nan")
    stats = coord.step()
    coord.zero_grad()
    return stats


def test_nonfinite_rolls_back_exactly_and_run_continues():
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS), total_steps=20,
                                guard=GuardConfig(backup_every=2, lr_factor=0.5, max_failures=3))
    for t in range(4):  # backups after good steps 2 and 4
        train_step(coord, model, t)
    good_mem = snapshot(coord.params("memory"))
    train_step(coord, model, 4)  # step 5: moves away from the backup
    trunk_before = snapshot(coord.params("trunk"))
    assert any(not torch.equal(p, q) for p, q in zip(coord.params("memory"), good_mem))

    stats = train_step(coord, model, 5, poison="memory")
    assert stats["grad/memory/nonfinite"] == 1.0 and stats["grad/memory/skipped"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(coord.params("memory"), good_mem))      # exact rollback
    assert any(not torch.equal(p, q) for p, q in zip(coord.params("trunk"), trunk_before))  # trunk stepped
    (event,) = coord.pop_events()
    assert event["component"] == "memory" and event["rolled_back_to"] == 4 and event["lr_scale"] == 0.5
    assert coord.components["memory"].guard.lr_scale == 0.5

    for t in range(6, 9):  # the run continues with finite weights and the reduced lr
        stats = train_step(coord, model, t)
        assert "grad/memory/nonfinite" not in stats
        assert stats["grad/memory/lr"] == pytest.approx(0.5 * 1e-2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_without_backup_leaves_parameters_untouched():
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS), guard=GuardConfig(backup_every=0))
    train_step(coord, model, 0)
    before = snapshot(model.parameters())
    x, y = data()
    coord.backward(lm(model, x, y) * float("inf"))  # every component non-finite
    stats = coord.step()
    assert stats["grad/trunk/nonfinite"] == 1.0 and stats["grad/memory/nonfinite"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert [e["rolled_back_to"] for e in coord.pop_events()] == [None, None]


def test_k_failures_in_a_row_raise_with_message():
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS), guard=GuardConfig(max_failures=2))
    train_step(coord, model, 0, poison="trunk")
    train_step(coord, model, 1)                 # a good step resets the count
    train_step(coord, model, 2, poison="trunk")
    with pytest.raises(TrainingDiverged, match=r"component 'trunk': non-finite gradients in 2 consecutive steps"):
        train_step(coord, model, 3, poison="trunk")


def test_guard_state_survives_checkpoint(tmp_path):
    model = make()
    guard = GuardConfig(backup_every=1)
    coord = GradientCoordinator(model, parse_components(SPECS), guard=guard)
    train_step(coord, model, 0)
    train_step(coord, model, 1, poison="memory")
    torch.save({"m": model.state_dict(), "c": coord.state_dict(include_backups=True)}, tmp_path / "c.pt")
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    model2 = make(seed=5)
    model2.load_state_dict(ck["m"])
    coord2 = GradientCoordinator(model2, parse_components(SPECS), guard=guard)
    coord2.load_state_dict(ck["c"])
    g1, g2 = coord.components["memory"].guard, coord2.components["memory"].guard
    assert (g2.lr_scale, g2.skipped, g2.failures, g2.backup_step) == (0.5, 1, 1, g1.backup_step)
    assert all(torch.equal(a, b) for a, b in zip(g1.backup, g2.backup))
    train_step(coord2, model2, 2, poison="memory")  # rollback from the restored backup
    assert all(torch.equal(p, b) for p, b in zip(coord2.params("memory"), g1.backup))


def test_guard_config_validation():
    with pytest.raises(ValueError, match="lr_factor"):
        GuardConfig(lr_factor=0.0)
    with pytest.raises(ValueError, match="max_failures"):
        GuardConfig(max_failures=0)
