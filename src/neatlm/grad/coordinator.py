"""GradientCoordinator: one object that owns backward, clipping, optimizers and schedules.

    coord = GradientCoordinator(model, parse_components(cfg_table), total_steps=2000, accum_steps=2)
    for step in range(2000):
        for micro in range(2):
            with coord.no_sync():                      # DDP: skip the all-reduce on early micro-steps
                logits, _ = model(x[micro])
                coord.backward(lm_loss(logits, y[micro]))           # every component
        stats = coord.step()                           # clip, guard, optimizer, schedule, monitors
        coord.zero_grad()

Per-component losses from one forward graph::

    coord.backward({"trunk": lm_loss(logits, y), "memory": recon_loss})

Each loss reaches only its own component's parameters (``torch.autograd.grad`` with that
component's parameters as inputs), so the trunk receives no gradient from ``recon_loss`` even
when the graphs overlap.

Test-time adaptation of one component::

    with coord.only("memory"):         # every other parameter has requires_grad=False here
        coord.backward(loss); coord.step(); coord.zero_grad()
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from .components import ComponentParams, ComponentSpec, assign_parameters, build_optimizers, default_components
from .guard import ComponentGuard, GuardConfig, TrainingDiverged
from .monitor import GradMonitor

__all__ = ["GradientCoordinator", "TrainingDiverged"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _Component:
    def __init__(self, group: ComponentParams, guard_cfg: GuardConfig):
        self.group = group
        self.spec: ComponentSpec = group.spec
        self.name = group.name
        self.params = group.params
        self.optimizers = build_optimizers(group)
        self.guard = ComponentGuard(self.name, self.params, guard_cfg)
        self.lr = self.spec.lr

    def grads(self) -> tuple[list[Tensor], list[Tensor]]:
        ps = [p for p in self.params if p.grad is not None]
        return ps, [p.grad for p in ps]


class GradientCoordinator:
    """Backward, clipping, NaN guard, optimizers and schedules for a model's components.

    Args:
        model: the model (may be wrapped in DistributedDataParallel).
        specs: component specs; ``None`` = one AdamW component ``all``.
        total_steps: optimizer steps of the run (the cosine schedules end there).
        accum_steps: micro-batches per optimizer step; ``backward`` divides losses by it.
        guard: NaN/Inf guard settings (:class:`GuardConfig`).
        monitor_every: steps between the costlier monitors (update ratio, gradient cosine).
    """

    def __init__(self, model: nn.Module, specs: list[ComponentSpec] | None = None, total_steps: int = 1,
                 accum_steps: int = 1, guard: GuardConfig | None = None, monitor_every: int = 1):
        if total_steps < 1:
            raise ValueError(f"total_steps = {total_steps!r}: must be >= 1")
        if accum_steps < 1:
            raise ValueError(f"accum_steps = {accum_steps!r}: must be >= 1")
        self.model = model
        self.total_steps = total_steps
        self.accum_steps = accum_steps
        self.guard_cfg = guard or GuardConfig()
        specs = specs if specs is not None else default_components()
        groups = assign_parameters(_unwrap(model), specs)
        self.components: dict[str, _Component] = {n: _Component(g, self.guard_cfg) for n, g in groups.items()}
        self.monitor = GradMonitor(monitor_every, final_step=total_steps - 1)
        self.step_count = 0          # completed optimizer steps
        self.micro_step = 0          # backward calls since the last step()
        self._active: set[str] | None = None
        self._manual_reduce = False
        self._events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        return list(self.components)

    def params(self, name: str) -> list[Tensor]:
        return list(self._get(name).params)

    def param_names(self, name: str) -> list[str]:
        return list(self._get(name).group.names)

    def importance(self) -> dict[str, float]:
        return {n: c.spec.importance for n, c in self.components.items()}

    def lr(self, name: str) -> float:
        """The learning rate this component's next step will use."""
        c = self._get(name)
        return c.spec.lr * c.spec.lr_factor(self.step_count, self.total_steps) * c.guard.lr_scale

    def pop_events(self) -> list[dict[str, Any]]:
        """Guard events (dicts) since the last call."""
        ev, self._events = self._events, []
        return ev

    def _get(self, name: str) -> _Component:
        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; components are {', '.join(self.components)}")
        return self.components[name]

    # ------------------------------------------------------------------------------ backward
    def backward(self, loss: Tensor | Mapping[str, Tensor], retain_graph: bool = False) -> None:
        """Accumulate gradients of ``loss`` / accum_steps.

        A tensor reaches every trainable parameter (plain ``Tensor.backward``). A mapping
        ``{component: loss}`` gives each component the gradient of its own loss only.
        """
        scale = self.accum_steps
        if isinstance(loss, Mapping):
            self._backward_isolated(loss, scale, retain_graph)
        else:
            (loss / scale if scale != 1 else loss).backward(retain_graph=retain_graph)
        self.micro_step += 1

    def _backward_isolated(self, losses: Mapping[str, Tensor], scale: int, retain_graph: bool) -> None:
        if not losses:
            raise ValueError("backward: empty dict of losses")
        items = list(losses.items())
        plan = []
        for name, loss in items:
            comp = self._get(name)
            if self._active is not None and name not in self._active:
                raise ValueError(f"backward: component {name!r} is frozen inside only({', '.join(sorted(self._active))})")
            params = [p for p in comp.params if p.requires_grad]
            if not params:
                raise ValueError(f"backward: component {name!r} has no trainable parameters")
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                raise ValueError(f"backward: loss for component {name!r} does not require grad")
            plan.append((name, loss, params))
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self._manual_reduce = True
        seen: set[int] = set()
        for i, (name, loss, params) in enumerate(plan):
            keep = retain_graph or i < len(plan) - 1
            try:
                grads = torch.autograd.grad(loss / scale if scale != 1 else loss, params,
                                            retain_graph=keep, allow_unused=True)
            except RuntimeError as e:
                if "backward an extra time" in str(e) and "selective" in str(e):
                    raise RuntimeError(
                        "backward: per-component losses run one backward pass per component, and torch's "
                        "selective activation checkpointing allows only one backward per region; use the "
                        "'full' or 'none' policy for blocks these losses share") from e
                raise
            if all(g is None for g in grads):
                raise ValueError(f"backward: the loss for component {name!r} does not reach any of its parameters")
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is None:
                        continue
                    if p.grad is None:
                        # autograd may hand the same buffer to several inputs (e.g. a + b), or an
                        # expanded view: own a private contiguous copy before anything is done in place
                        ptr = g.untyped_storage().data_ptr()
                        if ptr in seen or not g.is_contiguous():
                            g = g.clone(memory_format=torch.contiguous_format)
                        seen.add(g.untyped_storage().data_ptr())
                        p.grad = g
                    else:
                        p.grad.add_(g)

    @contextlib.contextmanager
    def no_sync(self, always: bool = False) -> Iterator[None]:
        """For a DDP-wrapped model: ``model.no_sync()`` unless this is the last micro-step.

        Put the forward and ``backward`` of each micro-step inside it. With per-component
        losses (a dict for ``backward``) under DDP pass ``always=True``: the coordinator then
        all-reduces the gradients itself in ``step()``.
        """
        model = self.model
        if isinstance(model, nn.parallel.DistributedDataParallel) and (
                always or self.micro_step < self.accum_steps - 1):
            with model.no_sync():
                yield
        else:
            yield

    def _all_reduce(self) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        for c in self.components.values():
            for p in c.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)

    # ------------------------------------------------------------------------------ step
    def step(self, log: bool | None = None) -> dict[str, float]:
        """Clip, guard and update every component that has gradients; returns flat stats.

        ``log`` forces (or suppresses) the costlier monitors for this step; by default they run
        when ``step_count % monitor_every == 0``.
        """
        t = self.step_count
        log = self.monitor.is_log_step(t) if log is None else log
        keep = self.monitor.is_log_step(t + 1)
        if self._manual_reduce:
            self._all_reduce()
            self._manual_reduce = False
        todo = []
        for name, c in self.components.items():
            if self._active is not None and name not in self._active:
                continue
            c.guard.ensure_backup(t)
            ps, gs = c.grads()
            if gs:
                todo.append((c, ps, gs))
        stats: dict[str, float] = {}
        if todo:
            norms = [torch.nn.utils.get_total_norm(gs, 2.0) for _, _, gs in todo]
            dev = norms[0].device
            norm_vals = torch.stack([n.to(dev) for n in norms]).tolist()
        else:
            norms, norm_vals = [], []
        total_sq = 0.0
        for (c, ps, gs), norm_t, norm in zip(todo, norms, norm_vals):
            name = c.name
            stats[f"grad/{name}/norm"] = norm
            if not math.isfinite(norm):
                stats[f"grad/{name}/nonfinite"] = 1.0
                self.monitor.forget(name)
                self._events.append(c.guard.on_nonfinite(t, norm))   # may raise TrainingDiverged
                stats[f"grad/{name}/skipped"] = float(c.guard.skipped)
                stats[f"grad/{name}/lr"] = 0.0
                continue
            total_sq += norm * norm
            clip = c.spec.clip
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(ps, clip, norm_t)
                stats[f"grad/{name}/clipped"] = 1.0 if norm > clip else 0.0
            factor = c.spec.lr_factor(t, self.total_steps) * c.guard.lr_scale
            for opt in c.optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
            c.lr = c.spec.lr * factor
            self.monitor.before_update(name, ps, gs, log, keep)
            for opt in c.optimizers:
                opt.step()
            self.monitor.after_update(name, ps)
            c.guard.after_good_step(t + 1)
            stats[f"grad/{name}/lr"] = c.lr
            stats[f"grad/{name}/skipped"] = float(c.guard.skipped)
        if todo:
            stats["grad/total_norm"] = math.sqrt(total_sq)
        stats.update(self.monitor.collect())
        self.step_count += 1
        self.micro_step = 0
        return stats

    def zero_grad(self) -> None:
        """Drop the gradients of every component (``set_to_none``)."""
        for c in self.components.values():
            for p in c.params:
                p.grad = None
        self.micro_step = 0

    # ------------------------------------------------------------------------------ isolation
    @contextlib.contextmanager
    def only(self, *names: str) -> Iterator["GradientCoordinator"]:
        """Freeze every parameter outside ``names`` (requires_grad=False); restore exactly on exit.

        ``step()`` inside only updates these components. Meant for test-time adaptation.
        """
        if not names:
            raise ValueError("only(): name at least one component")
        keep = set()
        for n in names:
            keep.update(id(p) for p in self._get(n).params)
        model = _unwrap(self.model)
        saved = [(p, p.requires_grad) for p in model.parameters()]
        prev_active = self._active
        try:
            for p, _ in saved:
                if id(p) not in keep:
                    p.requires_grad_(False)
            self._active = set(names) if prev_active is None else set(names) & prev_active
            yield self
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)
            self._active = prev_active

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self, include_backups: bool = False) -> dict[str, Any]:
        """Optimizers, schedule position, guard and monitor state: tensors, numbers, strings, lists,
        dicts only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": 2,
            "step": self.step_count,
            "total_steps": self.total_steps,
            "components": {
                n: {"optimizers": [o.state_dict() for o in c.optimizers],
                    "guard": c.guard.state_dict(include_backups),
                    "param_names": list(c.group.names)}
                for n, c in self.components.items()
            },
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Everything is checked against this model first (names,
        shapes of every optimizer state, backup and kept gradient), so a state of another model
        fails here with a ValueError, not at the next step; on failure nothing has been changed."""
        if sd.get("version", 1) not in (1, 2):
            raise ValueError(f"coordinator state version {sd.get('version')!r} is not 1 or 2")
        comps = sd["components"]
        missing = [n for n in self.components if n not in comps]
        extra = [n for n in comps if n not in self.components]
        if missing or extra:
            raise ValueError(f"coordinator state: components differ (missing {missing}, unexpected {extra})")
        monitor = sd.get("monitor")  # version 1 had none: the monitor starts empty
        for n, c in self.components.items():
            cs = comps[n]
            if list(cs["param_names"]) != list(c.group.names):
                raise ValueError(f"coordinator state: component {n!r} holds different parameters than the checkpoint")
            if len(cs["optimizers"]) != len(c.optimizers):
                raise ValueError(f"coordinator state: component {n!r} has a different optimizer layout")
            _check_shapes(n, c, cs, monitor["prev"].get(n) if monitor else None)
        for n, c in self.components.items():
            cs = comps[n]
            for o, osd in zip(c.optimizers, cs["optimizers"]):
                o.load_state_dict(osd)
            c.guard.load_state_dict(cs["guard"])
        if monitor is not None:
            devices = {n: c.params[0].device for n, c in self.components.items() if c.params}
            self.monitor.load_state_dict({"prev": {n: [g.to(devices[n]) for g in gs] for n, gs in monitor["prev"].items()},
                                          "angle_history": monitor["angle_history"]})
        self.step_count = int(sd["step"])
        self.micro_step = 0


def _check_shapes(name: str, comp: _Component, cs: Mapping[str, Any], prev: list[Tensor] | None) -> None:
    """Every tensor saved for a parameter has its shape (the optimizers' own load checks only counts)."""
    names = {id(p): n for p, n in zip(comp.params, comp.group.names)}

    def check(what: str, p: Tensor, t: Any) -> None:
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"component {name!r}: the saved {what} of {names[id(p)]} is {got}, the parameter "
                             f"{tuple(p.shape)} (a state of another model?)")

    for opt, osd in zip(comp.optimizers, cs["optimizers"]):
        params = [p for g in opt.param_groups for p in g["params"]]
        ids = [i for g in osd["param_groups"] for i in g["params"]]
        if len(ids) != len(params):
            raise ValueError(f"component {name!r}: the saved optimizer has {len(ids)} parameters, this one "
                             f"{len(params)}")
        for p, i in zip(params, ids):
            for key, t in osd["state"].get(i, {}).items():
                if isinstance(t, Tensor) and t.dim() > 0:  # scalars such as Adam's step count have no shape
                    check(f"optimizer state {key!r}", p, t)
    backup = cs["guard"].get("backup")
    if backup is not None:
        if len(backup) != len(comp.params):
            raise ValueError(f"component {name!r}: the saved guard backup has {len(backup)} tensors, the component "
                             f"{len(comp.params)} parameters")
        for p, b in zip(comp.params, backup):
            check("guard backup", p, b)
    if prev is not None:  # gradients of the parameters that had one, in order
        it = iter(comp.params)
        for g in prev:
            p = next((p for p in it if isinstance(g, Tensor) and tuple(p.shape) == tuple(g.shape)), None)
            if p is None:
                raise ValueError(f"component {name!r}: the monitor's kept gradients do not fit its parameters")
