"""Per-component gradient monitors, returned as a flat metrics dict.

Keys (``<c>`` is the component name):

- ``grad/<c>/norm``          gradient norm before clipping (every step: the guard needs it anyway)
- ``grad/<c>/lr``            learning rate used for this step
- ``grad/<c>/skipped``       total steps skipped by the NaN guard so far
- ``grad/<c>/clipped``       1.0 when clipping scaled the gradient down
- ``grad/<c>/update_ratio``  ||w_after - w_before|| / ||w_before||         (logged steps only)
- ``grad/<c>/cos_prev``      cosine between this step's and the previous step's gradient
                             (logged steps only; the previous gradient is copied only on the
                             step just before a logged step)
- ``grad/total_norm``        norm over all finite component gradients

Everything a logged step needs is reduced on the device and moved to the host in one transfer.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor


def _sq_sum(ts: list[Tensor]) -> Tensor:
    return torch.stack([t.detach().float().pow(2).sum() for t in ts]).sum()


class GradMonitor:
    """Cheap per-component statistics on logged steps: 0, every, 2*every... and ``final_step``.

    :meth:`is_log_step` is the schedule of logged steps for whoever records them (the trainer
    asks it too), so that the gradient the next logged step compares with is always kept.
    """

    def __init__(self, every: int = 1, history: int = 256, final_step: int | None = None):
        if every < 1:
            raise ValueError(f"monitor every = {every!r}: must be >= 1")
        self.every = every
        self.final_step = final_step
        self._prev: dict[str, list[Tensor]] = {}
        self.angle_history: dict[str, deque[float]] = {}
        self._history = history
        self._before: dict[str, list[Tensor]] = {}
        self._pending: dict[str, Tensor] = {}

    def is_log_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based: completed steps before it) is logged."""
        return step % self.every == 0 or step == self.final_step

    # called by the coordinator around one component's optimizer step
    def before_update(self, name: str, params: list[Tensor], grads: list[Tensor], log: bool, keep: bool) -> None:
        """``log``: this step is logged; ``keep``: the next one is (so keep this gradient)."""
        if log:
            self._before[name] = [p.detach().clone() for p in params]
            prev = self._prev.pop(name, None)
            if prev is not None and len(prev) == len(grads):
                dot = torch.stack([(g.detach().float() * q.float()).sum() for g, q in zip(grads, prev)]).sum()
                denom = (_sq_sum(grads) * _sq_sum(prev)).sqrt()
                self._pending[f"grad/{name}/cos_prev"] = dot / denom.clamp_min(1e-30)
        if keep:
            self._prev[name] = [g.detach().clone() for g in grads]
        else:
            self._prev.pop(name, None)

    def after_update(self, name: str, params: list[Tensor]) -> None:
        before = self._before.pop(name, None)
        if before is None:
            return
        diff = torch.stack([(p.detach().float() - b.float()).pow(2).sum() for p, b in zip(params, before)]).sum()
        self._pending[f"grad/{name}/update_ratio"] = diff.sqrt() / _sq_sum(before).sqrt().clamp_min(1e-30)

    def collect(self) -> dict[str, float]:
        """Move the pending device scalars to the host in one transfer."""
        if not self._pending:
            return {}
        keys = list(self._pending)
        dev = self._pending[keys[0]].device
        vals = torch.stack([self._pending[k].to(dev).float() for k in keys]).tolist()
        self._pending.clear()
        out = dict(zip(keys, vals))
        for k, v in out.items():
            if k.endswith("/cos_prev"):
                name = k.split("/")[1]
                self.angle_history.setdefault(name, deque(maxlen=self._history)).append(v)
        return out

    # checkpoints: the gradient kept for the next logged step's cosine, and the cosine history
    def state_dict(self) -> dict[str, Any]:
        return {"prev": {n: [g.clone() for g in gs] for n, gs in self._prev.items()},
                "angle_history": {n: list(h) for n, h in self.angle_history.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        prev, history = sd["prev"], sd["angle_history"]
        if not isinstance(prev, dict) or not all(isinstance(g, Tensor) for gs in prev.values() for g in gs):
            raise ValueError("monitor state: the kept gradients are not lists of tensors")
        self._prev = {n: list(gs) for n, gs in prev.items()}
        self.angle_history = {n: deque((float(v) for v in h), maxlen=self._history) for n, h in history.items()}
        self._before.clear()
        self._pending.clear()

    def forget(self, name: str) -> None:
        """Drop the stored gradient of a component (after a skipped step)."""
        self._prev.pop(name, None)
        self._before.pop(name, None)
