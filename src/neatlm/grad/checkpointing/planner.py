"""The memory-budget planner: the cheapest policies whose measured saved activations fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from ..components import assign_parameters
from .measure import ActivationProbe, measure_activations
from .policies import POLICIES, apply_checkpointing, default_units
from .selective import SAVE_OPS

_LEVEL = {"none": 0, "selective": 1, "full": 2}


@dataclass
class CheckpointPlan:
    """The policies chosen for a memory budget, with the probe measurements behind the choice."""

    policies: dict[str, str]
    measured_bytes: int            # saved-activation bytes of the chosen plan, measured
    budget: int
    fits: bool
    probes: dict[str, ActivationProbe] = field(default_factory=dict)   # "none" / "selective" / "full"

    save_ops: frozenset = SAVE_OPS

    def apply(self, model: nn.Module) -> dict[str, str]:
        return apply_checkpointing(model, self.policies, save_ops=self.save_ops)

    def summary(self) -> str:
        counts = {p: sum(1 for v in self.policies.values() if v == p) for p in POLICIES}
        none = self.probes["none"].total if "none" in self.probes else 0
        less = f", {100 * (1 - self.measured_bytes / none):.0f}% less than none" if none else ""
        return (f"checkpointing: {counts['none']} none, {counts['selective']} selective, {counts['full']} full; "
                f"saved activations {self.measured_bytes / 2**20:.1f} MiB (budget {self.budget / 2**20:.1f} MiB"
                f"{less}){'' if self.fits else ' - DOES NOT FIT'}")


def choose_checkpointing(model: nn.Module, step_fn: Callable[[nn.Module], Any], memory_budget: int,
                         units: Iterable[str] | Mapping[str, float] | None = None,
                         save_ops: Iterable = SAVE_OPS) -> CheckpointPlan:
    """The cheapest policies whose measured saved-activation bytes fit ``memory_budget``.

    Three probe steps measure every unit under none, selective and full. Units are then upgraded
    one rung at a time until the budget is met: lowest importance first (the least important
    units are checkpointed fully before a more important one is touched); among equally
    important units, selective on all of them before full on any (selective is the cheap
    policy), larger measured saving first; a rung is taken only where the probe shows a saving.
    The candidate is measured again; if interactions between units leave it above the budget,
    climbing continues. ``fits`` is False when even everything full is above the budget.

    ``units``: module paths, or ``{path: importance}`` (see :func:`component_units`); default
    every block of ``model.blocks`` with importance 1.
    """
    if memory_budget < 0:
        raise ValueError(f"memory_budget = {memory_budget!r}: must be >= 0 bytes")
    if units is None:
        imp = {u: 1.0 for u in default_units(model)}
    elif isinstance(units, Mapping):
        imp = {u: float(v) for u, v in units.items()}
    else:
        imp = {u: 1.0 for u in units}
    paths = list(imp)
    save_ops = frozenset(save_ops)
    probes = {pol: measure_activations(model, step_fn, {u: pol for u in paths}, units=paths, save_ops=save_ops)
              for pol in POLICIES}
    order = {u: i for i, u in enumerate(paths)}
    saving = {(u, pol): probes["none"].per_unit[u] - probes[pol].per_unit[u] for u in paths for pol in POLICIES}
    rungs = sorted(((u, pol) for u in paths for pol in ("selective", "full")),
                   key=lambda r: (imp[r[0]], _LEVEL[r[1]], -saving[r], order[r[0]]))
    plan = {u: "none" for u in paths}
    outside = probes["none"].outside

    def estimate(p: dict[str, str]) -> int:
        return outside + sum(probes[p[u]].per_unit[u] for u in paths)

    measured = probes["none"].total
    i = 0
    while measured > memory_budget and i < len(rungs):
        changed = False
        while i < len(rungs):  # climb until the additive estimate fits, then measure
            u, pol = rungs[i]
            i += 1
            if _LEVEL[pol] > _LEVEL[plan[u]] and probes[pol].per_unit[u] < probes[plan[u]].per_unit[u]:
                plan[u] = pol
                changed = True
                if estimate(plan) <= memory_budget:
                    break
        if not changed:
            break
        measured = measure_activations(model, step_fn, plan, units=paths, save_ops=save_ops).total
    return CheckpointPlan(policies=dict(plan), measured_bytes=measured, budget=int(memory_budget),
                          fits=measured <= memory_budget, probes=probes, save_ops=save_ops)


# ----------------------------------------------------------------------------- components

def component_units(model: nn.Module, components: Any, within: Iterable[str] | None = None) -> dict[str, float]:
    """Units that each belong to one component, with that component's importance.

    ``components``: a :class:`~neatlm.grad.coordinator.GradientCoordinator` or a list of
    :class:`~neatlm.grad.components.ComponentSpec`. Inside each block (``within``, default
    ``model.blocks``), the largest submodules whose parameters all belong to one component
    become units; a block owned by a single component is one unit. Parameter-free modules are
    skipped. Returns ``{module path: importance}``.
    """
    if hasattr(components, "components") and hasattr(components, "importance"):
        owner = {n: c for c in components.names for n in components.param_names(c)}
        imp = components.importance()
    else:
        groups = assign_parameters(model, list(components))
        owner = {n: g.name for g in groups.values() for n in g.names}
        imp = {g.name: g.spec.importance for g in groups.values()}
    roots = list(within) if within is not None else default_units(model)
    modules = dict(model.named_modules())
    out: dict[str, float] = {}

    def owners(path: str, mod: nn.Module) -> set[str]:
        return {owner[f"{path}.{n}"] for n, p in mod.named_parameters() if f"{path}.{n}" in owner}

    def visit(path: str) -> None:
        mod = modules[path]
        own = owners(path, mod)
        if not own:
            return
        if len(own) == 1:
            out[path] = imp[next(iter(own))]
            return
        if any(True for _ in mod.parameters(recurse=False)):
            raise ValueError(f"checkpointing: module {path!r} holds parameters of several components "
                             f"({', '.join(sorted(own))}) directly; checkpoint it as one unit instead")
        for name, _ in mod.named_children():
            visit(f"{path}.{name}")

    for r in roots:
        visit(r)
    return out
