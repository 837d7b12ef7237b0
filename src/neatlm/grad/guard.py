"""Divergence guard: no component keeps a step that failed, and a run that keeps failing stops.

A step of a component *fails* when

1. its loss or its gradient norm is not finite: the optimizer step is not taken; or
2. the optimizer step made its parameters diverge: their norm after the step is not finite (a
   NaN/Inf parameter, or values so large that the norm overflows), or it grew more than
   ``max_growth``-fold in this one step, ``||w_after|| > max_growth * ||w_before||``. A healthy
   step changes a component's norm by a small fraction (update/weight ratios of 1e-3, 1e-1 at
   the most aggressive); a step that makes it 100 times larger has replaced the learned weights
   by the update itself, the signature of a runaway learning rate (AdamW at lr 1e30 pushes every
   weight to 1e30: finite, yet the next forward overflows; its first step grows matrices drawn
   with std 0.02 about lr / 0.02-fold, norm weights at 1 much less). A component whose
   parameters are all zero has no scale to compare with; only the finiteness rule applies to it.

A failed step is undone exactly, so nothing of it survives: the parameters and the optimizer state
(moments, step counts) are those from before the step, the last accepted state, and no checkpoint
or backup can hold them. Then the component (and only that component)

* drops its gradients,
* after a non-finite loss or gradient, which the last accepted parameters themselves produced,
  goes further back, to its last backup if backups are kept (``backup_every`` > 0: a copy taken
  after every ``backup_every``-th accepted step); a rejected update needs no more than its undo,
* multiplies its learning-rate scale by ``lr_factor``,
* logs one warning line saying what failed and what was done (the coordinator's step stats carry
  ``grad/<c>/rejected``, which the trainer writes to the metrics stream).

``max_failures`` failed steps in a row, with no accepted step between, raise
:class:`TrainingDiverged` naming the component, the steps and what to try; an accepted step resets
the count. Step numbers count optimizer steps from 1, as the trainer's metrics and checkpoints do:
"step 5" is the fifth step, "rolled back to step 4" is the state after four steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingDiverged
from ..settings import check_settings, setting

__all__ = ["ComponentGuard", "GuardConfig", "TrainingDiverged", "REASONS"]

log = logging.getLogger("neatlm.grad")

# why a step failed (the ``reason`` of :meth:`ComponentGuard.on_failure`)
REASONS = ("nonfinite_loss", "nonfinite_grad", "nonfinite_params", "exploding_update")


@dataclass
class GuardConfig:
    """[guard]: which steps of a component are rejected, how it recovers, and when training stops
    (checked on construction, so a guard built in Python fails like one from TOML)."""

    max_failures: int = setting(3, "rejected steps in a row of one component that stop training", min=1)
    lr_factor: float = setting(0.5, "a component's learning-rate multiplier after each rejected step",
                               min=1e-9, max=1.0)
    max_growth: float = setting(100.0, "reject a step that multiplies a component's parameter norm by more "
                                "than this (an exploding update)", min=2.0)
    backup_every: int = setting(100, "keep a copy of the parameters every N accepted steps, to roll back to "
                                "after a non-finite loss or gradient; 0 = no backups", min=0)
    backup_device: str = setting("same", "where backups live", choices=("same", "cpu"))

    def __post_init__(self) -> None:
        check_settings("guard", self)


def _describe(reason: str, info: dict[str, Any], cfg: GuardConfig) -> str:
    if reason == "nonfinite_loss":
        return "the loss is not finite"
    if reason == "nonfinite_grad":
        return f"the gradient norm is {info['grad_norm']}"
    if reason == "nonfinite_params":
        return f"the update made the parameter norm {info['param_norm']}"
    return (f"the update multiplied the parameter norm by {info['growth']:.3g} "
            f"(above guard.max_growth = {cfg.max_growth:g})")


class ComponentGuard:
    """Guard state of one component: failure count, lr scale, parameter backup.

    ``verbose``: log a warning line per rejected step (off on all but one process of a
    data-parallel run, where every process takes the same decision).
    """

    def __init__(self, name: str, params: list[torch.Tensor], cfg: GuardConfig, verbose: bool = True):
        self.name = name
        self.params = params
        self.cfg = cfg
        self.verbose = verbose
        self.lr_scale = 1.0
        self.failures = 0          # consecutive
        self.skipped = 0           # total
        self.backup: list[torch.Tensor] | None = None
        self.backup_step = -1
        self._good_steps = 0
        self._first_failed = 0     # step number of the first failure of the current run of failures
        self._last: tuple[int, str, dict[str, Any], bool] | None = None   # the latest failure
        self._state_step: int | None = None   # the step whose state the parameters hold

    # -- backups -------------------------------------------------------------------------------
    def _backup_device(self, p: torch.Tensor) -> torch.device:
        """Where the backup of parameter ``p`` lives (``guard.backup_device``)."""
        return torch.device("cpu") if self.cfg.backup_device == "cpu" else p.device

    @torch.no_grad()
    def take_backup(self, step: int) -> bool:
        """Copy the parameters if they are all finite; returns whether a backup was taken."""
        if self.cfg.backup_every <= 0:
            return False
        finite = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
        if not bool(finite):
            return False
        if self.backup is None:
            self.backup = [p.detach().to(self._backup_device(p), copy=True) for p in self.params]
        else:
            for b, p in zip(self.backup, self.params):
                b.copy_(p.detach())
        self.backup_step = step
        return True

    def ensure_backup(self, step: int) -> None:
        if self.cfg.backup_every > 0 and self.backup is None:
            self.take_backup(step)

    def after_good_step(self, step: int) -> None:
        """Call after an accepted update; ``step`` counts completed steps (this one included)."""
        self.failures = 0
        self._good_steps += 1
        self._state_step = step
        if self.cfg.backup_every > 0 and self._good_steps % self.cfg.backup_every == 0:
            self.take_backup(step)

    # -- failures ------------------------------------------------------------------------------
    @torch.no_grad()
    def on_failure(self, step: int, reason: str, **info: Any) -> None:
        """Handle a rejected step (numbered from 1) whose update, if any, the caller has undone:
        drop the gradients, roll back to the backup (non-finite loss or gradient only), cut the lr,
        log one line.

        ``info``: ``grad_norm`` (every reason), ``param_norm`` (nonfinite_params), ``growth``
        (exploding_update). Check :attr:`diverged` afterwards.
        """
        if reason not in REASONS:
            raise ValueError(f"unknown guard failure {reason!r}; known: {', '.join(REASONS)}")
        for p in self.params:
            p.grad = None
        rolled_back = False
        if self._state_step is None:
            self._state_step = step - 1
        if self.backup is not None and reason in ("nonfinite_loss", "nonfinite_grad"):
            for b, p in zip(self.backup, self.params):
                p.copy_(b)
            rolled_back = True
            self._state_step = self.backup_step
        if self.failures == 0:
            self._first_failed = step
        self.failures += 1
        self.skipped += 1
        self.lr_scale *= self.cfg.lr_factor
        self._last = (step, reason, info, rolled_back)
        if self.verbose:
            undone = "step skipped" if reason in ("nonfinite_loss", "nonfinite_grad") else "update undone"
            where = f", parameters rolled back to step {self.backup_step}" if rolled_back else ""
            log.warning("neatlm guard: component %r, step %d rejected: %s; %s%s, lr scale now %.3g "
                        "(%d of guard.max_failures = %d in a row)", self.name, step,
                        _describe(reason, info, self.cfg), undone, where, self.lr_scale, self.failures,
                        self.cfg.max_failures)

    @property
    def diverged(self) -> bool:
        """``max_failures`` rejected steps in a row: training must stop (see :meth:`error`)."""
        return self.failures >= self.cfg.max_failures

    def error(self) -> TrainingDiverged:
        """The one-line error for a component that :attr:`diverged`."""
        assert self._last is not None, "error(): no failure recorded"
        step, reason, info, rolled_back = self._last
        first, name = self._first_failed, self.name
        steps = f"step {step}" if first == step else f"steps {first}-{step}"
        state = "the initial ones" if self._state_step == 0 else f"those after step {self._state_step}"
        state += " (its last backup)" if rolled_back else ""
        return TrainingDiverged(
            f"component {name!r} diverged: {self.failures} steps in a row rejected ({steps}; the last because "
            f"{_describe(reason, info, self.cfg)}); its parameters are {state}, with the learning rate cut to "
            f"{self.lr_scale:.3g}x. Try a lower learning rate (train.lr or components.{name}.lr), gradient "
            f"clipping (train.grad_clip or components.{name}.clip) or a longer warmup (train.warmup_steps); "
            "if the loss itself is not finite, check the data.")

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, lr scale and the parameter backup, if one has been taken."""
        sd: dict[str, Any] = {"lr_scale": self.lr_scale, "failures": self.failures, "skipped": self.skipped,
                              "good_steps": self._good_steps, "backup_step": self.backup_step,
                              "first_failed": self._first_failed}
        if self.backup is not None:
            sd["backup"] = [b.clone() for b in self.backup]
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.lr_scale = float(sd["lr_scale"])
        self.failures = int(sd["failures"])
        self.skipped = int(sd["skipped"])
        self._good_steps = int(sd["good_steps"])
        self.backup_step = int(sd["backup_step"])
        self._first_failed = int(sd.get("first_failed", 0))
        if "backup" in sd:
            self.backup = [b.to(self._backup_device(p), copy=True) for b, p in zip(sd["backup"], self.params)]
        else:
            self.backup = None  # retaken from the (restored) parameters at the next step
