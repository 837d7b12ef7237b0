"""Measuring what autograd keeps for backward, by unit, under a policy.

The bytes are those of the tensors packed through ``torch.autograd.graph.saved_tensors_hooks``
that are still alive when the forward has finished, each storage once, parameters and buffers
excluded. Tensors held by torch's selective cache never reach those hooks; they are counted from
the selective policy function, which sees each op's output. Forward hooks on the units say whose
bytes they are. All of this state lives in one :class:`_SavedBytes` per call, so measurements
cannot leak into each other or into training.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .policies import applied, default_units, install, reinstall, remove_checkpointing, resolve
from .selective import SAVE_OPS


@dataclass
class ActivationProbe:
    """Saved-activation bytes of one probe step: total, by unit, and outside any unit."""

    total: int
    per_unit: dict[str, int]
    outside: int


class _SavedBytes:
    """Saved tensors by unit during one probe forward; :meth:`count` sums their storages.

    A tensor packed into a graph that the forward itself frees again (a memory layer's inner
    gradient step) is not kept for backward, and the allocator may hand its storage to a later
    tensor: so packed tensors are held weakly and counted only if still alive when the forward
    has finished, each storage once. Outputs the selective cache keeps are held by the cache
    under another tensor object, so they are held here until counted.
    """

    def __init__(self, exclude: set[tuple]):
        self.exclude = exclude
        self.saved: list[tuple[str, Callable[[], Tensor | None]]] = []
        self.units: list[str] = [""]   # "" = outside any unit

    def _keep(self, t: Any, strong: bool) -> None:
        if isinstance(t, Tensor) and t.device.type != "meta":
            self.saved.append((self.units[-1], (lambda t=t: t) if strong else weakref.ref(t)))

    def pack(self, t: Tensor) -> Tensor:
        self._keep(t, strong=False)
        return t

    def observe(self, out: Any) -> None:
        """An op output kept by torch's selective cache."""
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self._keep(t, strong=True)

    def count(self) -> dict[str, int]:
        """{unit: bytes} of the saved storages alive now, each counted once, for the unit that saved it first."""
        seen = set(self.exclude)
        per_unit: dict[str, int] = {}
        for unit, ref in self.saved:
            t = ref()
            if t is None:
                continue
            st = t.untyped_storage()
            key = (t.device, st.data_ptr())
            if key in seen or st.nbytes() == 0:
                continue
            seen.add(key)
            per_unit[unit] = per_unit.get(unit, 0) + st.nbytes()
        return per_unit

    def attribute(self, model: nn.Module, paths: Iterable[str]) -> list:
        """Forward hooks that make each unit's saves count for it; returns their handles."""
        def enter(path: str) -> Callable:
            def hook(module: nn.Module, args: Any) -> None:   # None: the arguments stay as they are
                self.units.append(path)
            return hook

        def leave(module: nn.Module, args: Any, out: Any) -> None:   # None: the output stays
            self.units.pop()

        handles = []
        for path in paths:
            module = model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(enter(path)))
            handles.append(module.register_forward_hook(leave, always_call=True))
        return handles


def measure_activations(model: nn.Module, step_fn: Callable[[nn.Module], Any],
                        policy: str | Mapping[str, str] | None = None,
                        units: Iterable[str] | None = None, save_ops: Iterable | None = None) -> ActivationProbe:
    """Run ``step_fn(model)`` (forward + loss, no backward) and measure saved-activation bytes.

    ``policy``: a plan to measure (applied for the probe only; the model's policies are restored
    afterwards); ``None`` measures the model as it is. ``units``: module paths whose bytes are
    reported separately (default: the plan's modules or ``model.blocks``). ``save_ops``: the
    selective policy's op list (default: the one each unit runs with, else SAVE_OPS).
    """
    before = applied(model)
    units = list(units) if units is not None else None
    remove_checkpointing(model)
    handles: list = []
    try:
        if policy is None:
            plan = {p: (run.policy, run.save_ops if save_ops is None else frozenset(save_ops))
                    for p, run in before.items()}
        else:
            ops = frozenset(save_ops) if save_ops is not None else (
                next(iter(before.values())).save_ops if before else SAVE_OPS)
            table = resolve(model, policy, units if isinstance(policy, str) else None)
            plan = {p: (pol, ops) for p, pol in table.items()}
        unit_paths = units if units is not None else (list(plan) or default_units(model))
        for u in unit_paths:
            plan.setdefault(u, ("none", SAVE_OPS))
        nested = [p for p in plan if any(p.startswith(q + ".") for q in plan)]
        if nested:
            raise ValueError(f"checkpointing: units {nested} lie inside other units")
        params = {(p.device, p.untyped_storage().data_ptr()) for p in model.parameters()}
        params |= {(b.device, b.untyped_storage().data_ptr()) for b in model.buffers()}
        probe = _SavedBytes(params)
        for path, (pol, ops) in plan.items():
            install(model, path, pol, ops, observe=probe.observe)
        handles = probe.attribute(model, plan)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
            out = step_fn(model)
        counted = probe.count()   # while ``out`` keeps the graph alive
        del out
    finally:
        for h in handles:
            h.remove()
        reinstall(model, before)
    per_unit = {u: counted.get(u, 0) for u in unit_paths}
    outside = sum(v for k, v in counted.items() if k not in per_unit)
    return ActivationProbe(total=sum(per_unit.values()) + outside, per_unit=per_unit, outside=outside)
