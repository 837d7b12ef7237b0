"""GradientCoordinator: one object that owns backward, clipping, the divergence guard, optimizers,
schedules and, in a data-parallel run, the averaging of gradients over processes.

    coord = GradientCoordinator(model, parse_components(cfg_table), total_steps=2000)
    for step in range(2000):
        for micro in range(2):
            logits = model(x[micro]).logits
            coord.backward(lm_loss(logits, y[micro]) / 2)       # every component
        stats = coord.step()        # average over processes, clip, guard, optimizer, schedule, monitors
        coord.zero_grad()

``backward`` adds the gradients of the losses as given: weighting them (here the mean over two
micro-batches) is the caller's, in the trainer :class:`neatlm.train.objective.StepObjective`.

Per-component losses from one forward graph::

    coord.backward({"trunk": lm_loss(logits, y), "memory": recon_loss})

Each loss reaches only its own component's parameters (``torch.autograd.grad`` with that
component's parameters as inputs), so the trunk receives no gradient from ``recon_loss`` even
when the graphs overlap.

Test-time adaptation of one component::

    with coord.only("memory"):         # every other parameter has requires_grad=False here
        coord.backward(loss); coord.step(); coord.zero_grad()

Every step goes through the guard (:mod:`neatlm.grad.guard`): a component whose loss or gradient
is not finite does not step, one whose update makes its parameters non-finite or explode has the
update undone exactly (parameters and optimizer state), and ``guard.max_failures`` rejected steps
in a row raise :class:`TrainingDiverged`. To undo a step the coordinator keeps one copy of each
component's parameters and optimizer state, on their device. A rejected step shows in the stats
``step()`` returns, ``grad/<c>/rejected`` = 1 (and ``grad/<c>/nonfinite`` = 1 when the loss or
gradient was not finite), and in the one warning line the guard logs with the details.

Data parallelism (``torchrun``): when ``torch.distributed`` is initialised with more than one
process at construction, the coordinator broadcasts the model's parameters and floating-point
buffers from rank 0, so every replica starts equal, and ``step()`` averages every parameter's
gradient over the processes in one all-reduce of a flattened bucket (one per device and dtype)
before anything else. A parameter without a gradient counts as zeros; one without a gradient on
every process keeps none, so its optimizer skips it exactly as in one process. Each process runs
its forwards and backwards as in a single process (any number per step, any state carried between
them, any parameters unused) and calls ``step()`` once per optimizer step like the others; the
guard decides on averaged values only, so every process accepts or rejects the same steps.

This replaces DistributedDataParallel, whose reducer assumes one forward per backward and a fixed
set of used parameters, and fails when a memory's state is carried between forwards (segments,
``memory.reset = "never"``), during TTL warmup, or when no memory chunk completes in a sequence.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .components import ComponentParams, ComponentSpec, assign_parameters, build_optimizers, default_components
from .guard import ComponentGuard, GuardConfig, TrainingDiverged
from .monitor import GradMonitor

__all__ = ["GradientCoordinator", "TrainingDiverged"]


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _by_device_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


@torch.no_grad()
def _broadcast_from_rank0(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (one broadcast per device and dtype)."""
    for idx in _by_device_dtype(tensors).values():
        ts = [tensors[i] for i in idx]
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _fits(dst: Any, src: Tensor) -> bool:
    """Whether ``src`` can be copied into ``dst`` in place (a tensor of its shape, dtype and device)."""
    return isinstance(dst, Tensor) and dst.shape == src.shape and dst.dtype == src.dtype and dst.device == src.device


def _copy_state(src: Mapping[str, Any], into: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of one parameter's optimizer state, reusing the tensors of ``into`` where they fit."""
    out: dict[str, Any] = {}
    for k, v in src.items():
        if isinstance(v, Tensor):
            old = into.get(k) if into else None
            if _fits(old, v):
                out[k] = old.copy_(v)
            else:
                out[k] = v.detach().clone()
        else:
            out[k] = copy.deepcopy(v)
    return out


class _Component:
    def __init__(self, group: ComponentParams, guard_cfg: GuardConfig, verbose: bool):
        self.group = group
        self.spec: ComponentSpec = group.spec
        self.name = group.name
        self.params = group.params
        self.optimizers = build_optimizers(group)
        self.guard = ComponentGuard(self.name, self.params, guard_cfg, verbose=verbose)
        self.lr = self.spec.lr
        self._undo_params: list[Tensor] | None = None
        self._undo_state: list[dict[Tensor, dict[str, Any]]] | None = None

    def grads(self) -> tuple[list[Tensor], list[Tensor]]:
        ps = [p for p in self.params if p.grad is not None]
        return ps, [p.grad for p in ps]

    @torch.no_grad()
    def save_undo(self) -> None:
        """Copy the parameters and the optimizer state before a step (the copies are reused)."""
        if self._undo_params is None:
            self._undo_params = [p.detach().clone() for p in self.params]
        else:
            for b, p in zip(self._undo_params, self.params):
                b.copy_(p.detach())
        previous = self._undo_state or [{} for _ in self.optimizers]
        self._undo_state = [{p: _copy_state(st, prev.get(p)) for p, st in opt.state.items()}
                            for opt, prev in zip(self.optimizers, previous)]

    @torch.no_grad()
    def undo(self) -> None:
        """Restore what :meth:`save_undo` copied: the step never happened."""
        assert self._undo_params is not None and self._undo_state is not None
        for b, p in zip(self._undo_params, self.params):
            p.copy_(b)
        for opt, saved in zip(self.optimizers, self._undo_state):
            for p in [p for p in opt.state if p not in saved]:   # state the step created
                del opt.state[p]
            for p, st in saved.items():
                cur = opt.state[p]
                for k in [k for k in cur if k not in st]:
                    del cur[k]
                for k, v in st.items():
                    now = cur.get(k)
                    if isinstance(v, Tensor) and _fits(now, v):
                        now.copy_(v)
                    else:
                        cur[k] = v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)


def _param_norm(params: list[Tensor]) -> Tensor:
    return torch.nn.utils.get_total_norm([p.detach() for p in params], 2.0).float()


class GradientCoordinator:
    """Backward, clipping, divergence guard, optimizers and schedules for a model's components.

    Args:
        model: the bare model (not wrapped in DistributedDataParallel: see the module docstring).
        specs: component specs; ``None`` = one AdamW component ``all``.
        total_steps: optimizer steps of the run (the cosine schedules end there).
        guard: divergence guard settings (:class:`GuardConfig`).
        monitor_every: the costlier monitors (update ratio, gradient cosine) run on steps 0,
            monitor_every, 2 * monitor_every, ... and on the final step, ``total_steps - 1``.
    """

    def __init__(self, model: nn.Module, specs: list[ComponentSpec] | None = None, total_steps: int = 1,
                 guard: GuardConfig | None = None, monitor_every: int = 1):
        if total_steps < 1:
            raise ValueError(f"total_steps = {total_steps!r}: must be >= 1")
        self.model = model
        self.total_steps = total_steps
        self.guard_cfg = guard or GuardConfig()
        self.rank, self.world = _process_group()
        specs = specs if specs is not None else default_components()
        groups = assign_parameters(model, specs)
        self.components: dict[str, _Component] = {n: _Component(g, self.guard_cfg, verbose=self.rank == 0)
                                                  for n, g in groups.items()}
        self.monitor = GradMonitor(monitor_every, final_step=total_steps - 1)
        self.step_count = 0          # completed optimizer steps
        self._active: set[str] | None = None
        self._loss_bad: Tensor | None = None   # per component: a non-finite loss since the last step
        if self.world > 1:
            _broadcast_from_rank0([p for p in model.parameters()] +
                                  [b for b in model.buffers() if b.is_floating_point()])

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

    def _get(self, name: str) -> _Component:
        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; components are {', '.join(self.components)}")
        return self.components[name]

    # ------------------------------------------------------------------------------ backward
    def backward(self, loss: Tensor | Mapping[str, Tensor], retain_graph: bool = False) -> None:
        """Accumulate the gradients of ``loss``, unscaled (the caller weighs its losses).

        A tensor reaches every trainable parameter (plain ``Tensor.backward``). A mapping
        ``{component: loss}`` gives each component the gradient of its own loss only.
        """
        if isinstance(loss, Mapping):
            self._backward_isolated(loss, retain_graph)
        else:
            self._note_loss(loss, None)
            loss.backward(retain_graph=retain_graph)

    def _note_loss(self, loss: Tensor, name: str | None) -> None:
        """Remember (on the device, without a sync) whether ``loss`` is finite, for the guard."""
        bad = torch.logical_not(torch.isfinite(loss.detach()).all()).float()
        if self._loss_bad is None:
            self._loss_bad = torch.zeros(len(self.components), device=bad.device)
        if name is None:
            self._loss_bad = torch.maximum(self._loss_bad, bad)
        else:
            i = list(self.components).index(name)
            self._loss_bad[i] = torch.maximum(self._loss_bad[i], bad)

    def _backward_isolated(self, losses: Mapping[str, Tensor], retain_graph: bool) -> None:
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
        seen: set[int] = set()
        for i, (name, loss, params) in enumerate(plan):
            keep = retain_graph or i < len(plan) - 1
            self._note_loss(loss, name)
            grads = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)
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

    @torch.no_grad()
    def _average_gradients(self, flags: Tensor) -> Tensor:
        """Replace every parameter's gradient by its mean over the processes (a missing gradient
        counts as zeros; missing on every process stays missing). ``flags`` (float32) are summed
        over the processes in the same all-reduce; returns the sums."""
        params = [p for c in self.components.values() for p in c.params]
        groups = _by_device_dtype(params)
        home = (flags.device, torch.float32)   # presence of each gradient and the flags travel here
        groups.setdefault(home, [])
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=flags.device)
        buckets = {}
        for key, idx in groups.items():
            sizes = [params[i].numel() for i in idx]
            tail = [present, flags] if key == home else []
            bucket = torch.zeros(sum(sizes) + sum(t.numel() for t in tail), device=key[0], dtype=key[1])
            offset = 0
            for i, n in zip(idx, sizes):
                if params[i].grad is not None:
                    bucket[offset:offset + n].copy_(params[i].grad.reshape(-1))
                offset += n
            if tail:
                bucket[offset:].copy_(torch.cat(tail))
            dist.all_reduce(bucket)
            buckets[key] = (bucket, sizes)
        bucket, sizes = buckets[home]
        counts = bucket[sum(sizes):]
        present_any = (counts[:len(params)] > 0).tolist()
        for key, idx in groups.items():
            bucket, sizes = buckets[key]
            offset = 0
            for i, n in zip(idx, sizes):
                p, mean = params[i], bucket[offset:offset + n].view_as(params[i]).div_(self.world)
                offset += n
                if not present_any[i]:
                    p.grad = None
                elif p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
        return counts[len(params):]

    # ------------------------------------------------------------------------------ step
    def step(self, log: bool | None = None) -> dict[str, float]:
        """Average over processes, clip, guard and update every component that has gradients;
        returns flat stats. Raises :class:`TrainingDiverged` (after every component has finished
        this step, rejected ones undone) when a component reaches ``guard.max_failures``.

        ``log`` forces (or suppresses) the costlier monitors for this step; by default they run on
        the monitor's schedule: when ``step_count % monitor_every == 0`` and on the final step
        (``step_count == total_steps - 1``).
        """
        t = self.step_count
        log = self.monitor.is_log_step(t) if log is None else log
        keep = self.monitor.is_log_step(t + 1)
        names = list(self.components)
        loss_bad = self._loss_bad
        self._loss_bad = None
        if self.world > 1:
            dev = loss_bad.device if loss_bad is not None else self.components[names[0]].params[0].device
            flags = loss_bad if loss_bad is not None else torch.zeros(len(names), device=dev)
            loss_bad = self._average_gradients(flags)
        todo = []
        for name, c in self.components.items():
            if self._active is not None and name not in self._active:
                continue
            c.guard.ensure_backup(t)
            ps, gs = c.grads()
            if gs:
                todo.append((c, ps, gs))
        stats: dict[str, float] = {}
        # one transfer to the host: every gradient norm and every loss flag
        if todo:
            norms = [torch.nn.utils.get_total_norm(gs, 2.0) for _, _, gs in todo]
            dev = norms[0].device
            host = torch.cat([torch.stack([n.to(dev).float() for n in norms]),
                              (loss_bad if loss_bad is not None else torch.zeros(len(names))).to(dev)]).tolist()
            norm_vals, bad_vals = host[:len(todo)], host[len(todo):]
        else:
            norms, norm_vals, bad_vals = [], [], []
        failed: list[tuple[_Component, str, dict[str, Any]]] = []
        stepped = []
        total_sq = 0.0
        for (c, ps, gs), norm_t, norm in zip(todo, norms, norm_vals):
            name = c.name
            stats[f"grad/{name}/norm"] = norm
            if bad_vals[names.index(name)] > 0 or not math.isfinite(norm):
                stats[f"grad/{name}/nonfinite"] = 1.0
                self.monitor.forget(name)
                reason = "nonfinite_loss" if bad_vals[names.index(name)] > 0 else "nonfinite_grad"
                failed.append((c, reason, {"grad_norm": norm}))
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
            c.save_undo()
            before = _param_norm(c.params)
            for opt in c.optimizers:
                opt.step()
            stepped.append((c, ps, norm, before, _param_norm(c.params)))
        # the verdict on each update: its parameter norms before and after, in one transfer
        if stepped:
            dev = stepped[0][3].device
            sizes = torch.stack([torch.stack([b.to(dev), a.to(dev)]) for *_, b, a in stepped])
            if self.world > 1:   # every process must take the same decision
                sizes = torch.nan_to_num(sizes, nan=math.inf)
                dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
            verdicts = sizes.tolist()
        else:
            verdicts = []
        for (c, ps, norm, *_), (before, after) in zip(stepped, verdicts):
            name = c.name
            if not math.isfinite(after):
                reason, info = "nonfinite_params", {"grad_norm": norm, "param_norm": after}
            elif before > 0 and after > self.guard_cfg.max_growth * before:
                reason, info = "exploding_update", {"grad_norm": norm, "growth": after / before}
            else:
                self.monitor.after_update(name, ps)
                c.guard.after_good_step(t + 1)
                stats[f"grad/{name}/lr"] = c.lr
                stats[f"grad/{name}/skipped"] = float(c.guard.skipped)
                continue
            c.undo()
            self.monitor.forget(name)
            failed.append((c, reason, info))
        for c, reason, info in failed:
            c.guard.on_failure(t + 1, reason, **info)
            stats[f"grad/{c.name}/rejected"] = 1.0
            stats[f"grad/{c.name}/lr"] = 0.0
            stats[f"grad/{c.name}/skipped"] = float(c.guard.skipped)
        if todo:
            stats["grad/total_norm"] = math.sqrt(total_sq)
        stats.update(self.monitor.collect())
        self.step_count += 1
        for c, _, _ in failed:
            if c.guard.diverged:
                raise c.guard.error()
        return stats

    def zero_grad(self) -> None:
        """Drop the gradients of every component (``set_to_none``)."""
        for c in self.components.values():
            for p in c.params:
                p.grad = None
        self._loss_bad = None

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
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
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
    def state_dict(self) -> dict[str, Any]:
        """Optimizers, schedule position, guard state (with each component's parameter backup) and
        monitor state: tensors, numbers, strings, lists, dicts only (loadable with
        ``torch.load(weights_only=True)``)."""
        return {
            "version": 2,
            "step": self.step_count,
            "total_steps": self.total_steps,
            "components": {
                n: {"optimizers": [o.state_dict() for o in c.optimizers],
                    "guard": c.guard.state_dict(),
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
