"""NaN/Inf guard: a component whose gradients are not finite never takes that step.

On a non-finite gradient norm the component (and only that component)

1. skips its optimizer step and drops its gradients,
2. rolls its parameters back to the last good backup, if backups are kept
   (``backup_every`` > 0: a copy taken after every ``backup_every``-th good step),
3. multiplies its learning-rate scale by ``lr_factor``,
4. records an event (a dict, also logged as a warning).

``max_failures`` failures in a row raise :class:`TrainingDiverged`; a good step resets the
count. The model therefore never silently carries NaN weights: either the step was skipped
(weights untouched), rolled back, or training stopped with a message.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingDiverged
from ..settings import check_settings, setting

__all__ = ["ComponentGuard", "GuardConfig", "TrainingDiverged"]

log = logging.getLogger("neatlm.grad")


@dataclass
class GuardConfig:
    """[guard]: when a component's non-finite steps stop training, and how it recovers (checked on
    construction, so a guard built in Python fails like one from TOML)."""

    max_failures: int = setting(3, "non-finite steps in a row of one component that stop training", min=1)
    lr_factor: float = setting(0.5, "a component's learning-rate multiplier after each non-finite step",
                               min=1e-9, max=1.0)
    backup_every: int = setting(100, "keep a rollback copy of the parameters every N good steps; "
                                "0 = no rollback", min=0)
    backup_device: str = setting("same", "where backups live", choices=("same", "cpu"))

    def __post_init__(self) -> None:
        check_settings("guard", self)


class ComponentGuard:
    """Guard state of one component: failure count, lr scale, parameter backup."""

    def __init__(self, name: str, params: list[torch.Tensor], cfg: GuardConfig):
        self.name = name
        self.params = params
        self.cfg = cfg
        self.lr_scale = 1.0
        self.failures = 0          # consecutive
        self.skipped = 0           # total
        self.backup: list[torch.Tensor] | None = None
        self.backup_step = -1
        self._good_steps = 0

    # -- backups -------------------------------------------------------------------------------
    @torch.no_grad()
    def take_backup(self, step: int) -> bool:
        """Copy the parameters if they are all finite; returns whether a backup was taken."""
        if self.cfg.backup_every <= 0:
            return False
        finite = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
        if not bool(finite):
            return False
        dev = (lambda p: "cpu") if self.cfg.backup_device == "cpu" else (lambda p: p.device)
        if self.backup is None:
            self.backup = [p.detach().to(dev(p), copy=True) for p in self.params]
        else:
            for b, p in zip(self.backup, self.params):
                b.copy_(p.detach())
        self.backup_step = step
        return True

    def ensure_backup(self, step: int) -> None:
        if self.cfg.backup_every > 0 and self.backup is None:
            self.take_backup(step)

    def after_good_step(self, step: int) -> None:
        """Call after a successful update; ``step`` counts completed steps."""
        self.failures = 0
        self._good_steps += 1
        if self.cfg.backup_every > 0 and self._good_steps % self.cfg.backup_every == 0:
            self.take_backup(step)

    # -- failures ------------------------------------------------------------------------------
    @torch.no_grad()
    def on_nonfinite(self, step: int, norm: float) -> dict[str, Any]:
        """Handle a non-finite gradient at ``step``: drop grads, roll back, cut lr; may raise."""
        for p in self.params:
            p.grad = None
        rolled_back = False
        if self.backup is not None:
            for b, p in zip(self.backup, self.params):
                p.copy_(b)
            rolled_back = True
        self.failures += 1
        self.skipped += 1
        self.lr_scale *= self.cfg.lr_factor
        event = {"event": "nonfinite_grad", "component": self.name, "step": step,
                 "grad_norm": norm if math.isfinite(norm) else str(norm),
                 "rolled_back_to": self.backup_step if rolled_back else None,
                 "lr_scale": self.lr_scale, "failures_in_a_row": self.failures}
        log.warning("component %r: non-finite gradient (norm %s) at step %d; step skipped, %s, "
                    "lr scale now %.3g", self.name, norm, step,
                    f"parameters rolled back to step {self.backup_step}" if rolled_back else "no backup kept",
                    self.lr_scale)
        if self.failures >= self.cfg.max_failures:
            raise TrainingDiverged(
                f"component {self.name!r}: non-finite gradients in {self.failures} consecutive steps "
                f"(last at step {step}); lr scale was cut to {self.lr_scale:.3g}"
                + (f" and parameters rolled back to step {self.backup_step}" if rolled_back else "")
                + ". Lower this component's lr, set its clip, or check the data and loss.")
        return event

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self, include_backup: bool = False) -> dict[str, Any]:
        sd: dict[str, Any] = {"lr_scale": self.lr_scale, "failures": self.failures, "skipped": self.skipped,
                              "good_steps": self._good_steps, "backup_step": self.backup_step}
        if include_backup and self.backup is not None:
            sd["backup"] = [b.clone() for b in self.backup]
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.lr_scale = float(sd["lr_scale"])
        self.failures = int(sd["failures"])
        self.skipped = int(sd["skipped"])
        self._good_steps = int(sd["good_steps"])
        self.backup_step = int(sd["backup_step"])
        if "backup" in sd:
            dev = (lambda p: "cpu") if self.cfg.backup_device == "cpu" else (lambda p: p.device)
            self.backup = [b.to(dev(p), copy=True) for b, p in zip(sd["backup"], self.params)]
        else:
            self.backup = None  # retaken from the (restored) parameters at the next step
