"""Divergence guard: skip, exact undo and rollback, lr cut, one log line, continue; K failures in a row
stop; the trainer records every rejected step in the metrics stream."""

from __future__ import annotations

import logging

import pytest
import torch

from neatlm.grad.components import ComponentSpec, parse_components
from neatlm.grad.coordinator import GradientCoordinator
from neatlm.grad.guard import GuardConfig, TrainingDiverged
from neatlm.train import checkpoint as ckpt
from neatlm.train.metrics import read_metrics
from neatlm.train.trainer import Trainer

from conftest import small_config
from test_grad_coordinator import SPECS, data, lm, make

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(ps):
    return [p.detach().clone() for p in ps]


def guard_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "neatlm.grad"]


def train_step(coord, model, seed, poison=None):
    x, y = data(seed=seed)
    coord.backward(lm(model, x, y))
    if poison is not None:
        coord.params(poison)[0].grad[0, 0] = float("nan")
    stats = coord.step()
    coord.zero_grad()
    return stats


def test_nonfinite_rolls_back_exactly_and_run_continues(caplog):
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS), total_steps=20,
                                guard=GuardConfig(backup_every=2, lr_factor=0.5, max_failures=3))
    for t in range(4):  # backups after good steps 2 and 4
        train_step(coord, model, t)
    good_mem = snapshot(coord.params("memory"))
    train_step(coord, model, 4)  # step 5: moves away from the backup
    trunk_before = snapshot(coord.params("trunk"))
    assert any(not torch.equal(p, q) for p, q in zip(coord.params("memory"), good_mem))

    with caplog.at_level(logging.WARNING, logger="neatlm.grad"):
        stats = train_step(coord, model, 5, poison="memory")
    assert stats["grad/memory/nonfinite"] == 1.0 and stats["grad/memory/skipped"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(coord.params("memory"), good_mem))      # exact rollback
    assert any(not torch.equal(p, q) for p, q in zip(coord.params("trunk"), trunk_before))  # trunk stepped
    (line,) = guard_lines(caplog)
    assert line.startswith("neatlm guard: component 'memory', step 6 rejected: the gradient norm is nan; step "
                           "skipped, parameters rolled back to step 4, lr scale now 0.5")
    assert coord.components["memory"].guard.lr_scale == 0.5

    for t in range(6, 9):  # the run continues with finite weights and the reduced lr
        stats = train_step(coord, model, t)
        assert "grad/memory/nonfinite" not in stats
        assert stats["grad/memory/lr"] == pytest.approx(0.5 * 1e-2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_without_backup_leaves_parameters_untouched(caplog):
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS), guard=GuardConfig(backup_every=0))
    train_step(coord, model, 0)
    before = snapshot(model.parameters())
    x, y = data()
    coord.backward(lm(model, x, y) * float("inf"))  # every component non-finite
    with caplog.at_level(logging.WARNING, logger="neatlm.grad"):
        stats = coord.step()
    assert stats["grad/trunk/nonfinite"] == 1.0 and stats["grad/memory/nonfinite"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    lines = guard_lines(caplog)
    assert len(lines) == 2 and not any("rolled back" in m for m in lines)


def test_k_failures_in_a_row_raise_with_message():
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS), guard=GuardConfig(max_failures=2))
    train_step(coord, model, 0, poison="trunk")
    train_step(coord, model, 1)                 # a good step resets the count
    train_step(coord, model, 2, poison="trunk")
    with pytest.raises(TrainingDiverged, match=r"component 'trunk' diverged: 2 steps in a row rejected \(steps 3-4; "
                       r"the last because the gradient norm is nan\).*Try a lower learning rate \(train\.lr or "
                       r"components\.trunk\.lr\)"):
        train_step(coord, model, 3, poison="trunk")


def test_guard_state_survives_checkpoint(tmp_path):
    model = make()
    guard = GuardConfig(backup_every=1)
    coord = GradientCoordinator(model, parse_components(SPECS), guard=guard)
    train_step(coord, model, 0)
    train_step(coord, model, 1, poison="memory")
    torch.save({"m": model.state_dict(), "c": coord.state_dict()}, tmp_path / "c.pt")
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
    with pytest.raises(ValueError, match=r"guard\.max_growth = 1\.0: must be >= 2"):
        GuardConfig(max_growth=1.0)


# ----------------------------------------------------------------------------- diverging updates

def opt_state(coord, name):
    """A deep copy of a component's optimizer states."""
    return [{p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in o.state.items()}
            for o in coord.components[name].optimizers]


def same_state(a, b):
    return all(pa is pb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k])
                                                          else sa[k] == sb[k] for k in sa)
               for x, y in zip(a, b) for (pa, sa), (pb, sb) in zip(x.items(), y.items()))


def set_lr(coord, name, lr):
    for o in coord.components[name].optimizers:
        for g in o.param_groups:
            g["base_lr"] = lr


def test_exploding_update_is_undone_exactly_and_counts_as_failure(caplog):
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS), guard=GuardConfig(max_failures=2, backup_every=1))
    for t in range(3):
        train_step(coord, model, t)
    params, state = snapshot(coord.params("memory")), opt_state(coord, "memory")
    trunk = snapshot(coord.params("trunk"))
    set_lr(coord, "memory", 1e6)   # finite weights, but Adam moves each by ~1e6: norm x ~1e7
    with caplog.at_level(logging.WARNING, logger="neatlm.grad"):
        stats = train_step(coord, model, 3)
    assert stats["grad/memory/rejected"] == 1.0 and "grad/memory/nonfinite" not in stats
    assert stats["grad/memory/lr"] == 0.0 and stats["grad/memory/skipped"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(coord.params("memory"), params))
    assert same_state(opt_state(coord, "memory"), state)   # moments and step counts untouched
    assert any(not torch.equal(p, q) for p, q in zip(coord.params("trunk"), trunk))   # trunk stepped
    (line,) = guard_lines(caplog)
    assert line.startswith("neatlm guard: component 'memory', step 4 rejected: the update multiplied the parameter "
                           "norm by ")
    # the undo restores the last accepted state: no further back
    assert "update undone, lr scale now 0.5" in line and "rolled back" not in line
    with pytest.raises(TrainingDiverged, match=r"component 'memory' diverged: 2 steps in a row rejected "
                       r"\(steps 4-5; the last because the update multiplied the parameter norm by .* \(above "
                       r"guard\.max_growth = 100\)\); its parameters are those after step 3"):
        train_step(coord, model, 4)
    assert all(torch.equal(p, q) for p, q in zip(coord.params("memory"), params))
    assert same_state(opt_state(coord, "memory"), state)


def test_rejected_first_step_leaves_no_optimizer_state(caplog):
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS))
    set_lr(coord, "trunk", 1e30)
    before = snapshot(coord.params("trunk"))
    with caplog.at_level(logging.WARNING, logger="neatlm.grad"):
        stats = train_step(coord, model, 0)
    assert stats["grad/trunk/rejected"] == 1.0 and "grad/memory/rejected" not in stats
    (line,) = guard_lines(caplog)   # 1e30 weights: the norm overflows
    assert "component 'trunk', step 1 rejected: the update made the parameter norm inf" in line
    assert all(torch.equal(p, q) for p, q in zip(coord.params("trunk"), before))
    assert all(len(o.state) == 0 for o in coord.components["trunk"].optimizers)


def test_growth_rule_does_not_apply_to_all_zero_parameters():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    holder = torch.nn.Module()
    holder.w = w
    coord = GradientCoordinator(holder, [ComponentSpec("w", lr=0.1, schedule="constant")])
    (w.sum() * 1.0).backward()
    stats = coord.step()
    assert "grad/w/rejected" not in stats and torch.all(w != 0)


def test_nonfinite_loss_is_rejected_even_with_finite_gradients(caplog):
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS))
    before = snapshot(model.parameters())
    x, y = data()
    coord.backward(lm(model, x, y) + torch.tensor(float("inf")))   # the inf reaches no parameter
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="neatlm.grad"):
        stats = coord.step()
    assert stats["grad/trunk/nonfinite"] == 1.0 and stats["grad/memory/nonfinite"] == 1.0
    assert [m.split(": ")[2].split(";")[0] for m in guard_lines(caplog)] == ["the loss is not finite"] * 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    coord.zero_grad()
    x, y = data(seed=2)   # per-component losses: only the component whose loss is not finite fails
    loss = lm(model, x, y)
    coord.backward({"trunk": loss, "memory": loss * float("nan")})
    stats = coord.step()
    assert "grad/trunk/rejected" not in stats and stats["grad/memory/rejected"] == 1.0


def test_each_rejected_step_logs_one_line_and_prints_nothing(caplog, capsys):
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS), guard=GuardConfig(backup_every=0))
    set_lr(coord, "memory", 1e30)
    with caplog.at_level(logging.WARNING, logger="neatlm.grad"):
        train_step(coord, model, 0)
        train_step(coord, model, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in m for m in lines)
    assert lines[1] == ("neatlm guard: component 'memory', step 2 rejected: the update made the parameter norm inf; "
                        "update undone, lr scale now 0.25 (2 of guard.max_failures = 3 in a row)")
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- the trainer

def test_trainer_with_huge_lr_stops_and_keeps_only_accepted_weights(corpus_dir, tmp_path):
    """lr 1e30 without clipping: once every step was accepted and pushed the weights to 1e28 while
    every other step failed, so the run ended "successfully" with exploded checkpoints."""
    cfg = small_config(corpus_dir, tmp_path / "run", steps=20, save_every=1, grad_clip=0.0)
    cfg.eval.every = 0
    trainer = Trainer(cfg)
    trainer.train(until_step=2)   # two accepted steps at a sane lr
    accepted = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    set_lr(trainer.coord, "all", 1e30)
    with pytest.raises(TrainingDiverged, match=r"component 'all' diverged: 3 steps in a row rejected \(steps 3-5;.*"
                       r"its parameters are those after step 2"):
        trainer.train()
    assert trainer.coord.step_count == 2 + cfg.guard.max_failures   # stopped at the third rejected step
    assert all(torch.equal(p, accepted[n]) for n, p in trainer.model.named_parameters())
    saved = ckpt.list_checkpoints(tmp_path / "run")
    loaded = [ckpt.load_checkpoint(d) for d in saved]
    assert [state["step"] for _, _, state, _ in loaded] == [3, 4]   # keep_last = 2; none after step 5
    for tensors, *_ in loaded:   # the rejected steps' checkpoints hold the accepted weights
        assert all(torch.equal(tensors[n], accepted[n]) for n in accepted)


def test_trainer_lr_1e30_from_the_start_stops_with_initial_weights(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "run", steps=20, lr=1e30, grad_clip=0.0)
    trainer = Trainer(cfg)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(TrainingDiverged, match=r"component 'all' diverged: 3 steps in a row rejected \(steps 1-3; "
                       r"the last because the update made the parameter norm inf\); its parameters are the initial "
                       r"ones"):
        trainer.train()
    assert all(torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())
    assert ckpt.list_checkpoints(tmp_path / "run") == []


def test_trainer_records_a_rejected_step_that_is_not_a_logged_step(corpus_dir, tmp_path, caplog):
    cfg = small_config(corpus_dir, tmp_path / "run", steps=8, log_every=4)   # logged: steps 1, 5 and 8
    trainer = Trainer(cfg)
    trainer.train(until_step=2)
    original, calls = trainer.model.embed.forward, []

    def poisoned_once(idx):   # the next training forward (step 3's only one) gives a non-finite loss
        calls.append(1)
        return original(idx) * (float("nan") if len(calls) == 1 else 1.0)

    trainer.model.embed.forward = poisoned_once
    with caplog.at_level(logging.WARNING, logger="neatlm.grad"):
        trainer.train()
    records = {r["step"]: r for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert sorted(records) == [1, 3, 5, 8]
    assert records[3]["grad/all/rejected"] == 1.0 and records[3]["grad/all/nonfinite"] == 1.0
    assert records[3]["grad/all/skipped"] == 1.0 and records[5]["grad/all/skipped"] == 1.0
    assert not any("rejected" in k for r in (records[1], records[5], records[8]) for k in r)
    (line,) = guard_lines(caplog)   # and the one log line
    assert "step 3 rejected: the loss is not finite" in line
