"""Activation checkpointing as a policy applied to a model, on top of ``torch.utils.checkpoint``.

Policies (per unit: a block, or any submodule such as one component inside a block):

- ``"none"``       autograd saves whatever it saves.
- ``"full"``       save only the unit's inputs; recompute the whole unit in backward.
- ``"selective"``  keep the outputs of matmul-like ops and recompute the cheap pointwise ops
                   around them. Where the unit has a fused path (a module with a
                   ``recompute_pointwise`` attribute: a block whose MLP is SwiGLU, or a SwiGLU),
                   that path runs: one autograd function whose backward rebuilds norm, silu and
                   product from the kept gate_up output (:mod:`neatlm.ops.recompute`), no replay
                   of the forward. The rest of such a unit keeps its activations: wrapping a
                   memory mixer in torch's selective checkpointing as well was measured worse
                   than "full" on it (-45% at +31% step time against -96% at +23%). A unit
                   without a fused path, and any unit under autocast, goes through torch's
                   ``create_selective_checkpoint_contexts``: it keeps the outputs of mm, addmm,
                   bmm, attention kernels and conv and replays the rest, running every op
                   through a Python dispatch mode, which on small CPU models costs ~20% step
                   time (the fused path: ~nothing).

All use the non-reentrant implementation, so units may take extra arguments, keyword arguments
and ``None``, and may return tuples such as ``(x, state)``. Gradients equal those of ``"none"``:
bit for bit under ``"full"`` and torch's selective path (recomputation replays the same ops with
the same RNG state), within float rounding on the fused path (a hand-written backward).

Applying a policy replaces ``module.forward`` on the instance (parameter names, state dicts and
``copy.deepcopy`` are unaffected)::

    apply_checkpointing(model, "selective")                      # every model.blocks[i]
    apply_checkpointing(model, {"blocks.0": "full", "blocks.*": "selective"})
    plan = choose_checkpointing(model, step_fn, memory_budget=200 * 2**20,
                                units=component_units(model, coordinator))
    plan.apply(model)

A unit's forward runs twice under ``full`` / ``selective`` (once more in backward), so it must
not mutate module state in its forward; blocks that pass state in and out as values are fine.
Torch's selective checkpointing allows one backward pass per region, so per-component losses
(``GradientCoordinator.backward({...})``, one pass per component) need ``full`` or ``none`` on
the regions they share; the coordinator says so if it happens. Apply policies before wrapping
the model in DDP (paths are those of the bare model).

:func:`measure_activations` runs a probe step (``step_fn(model)`` -> loss) and counts the bytes
autograd keeps for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``: every
packed tensor's storage, each storage once, parameters excluded; tensors held by the selective
cache are counted from the policy function, which sees each op's output.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "full", "selective")
_LEVEL = {"none": 0, "selective": 1, "full": 2}


def _ops(*names: str) -> frozenset:
    out = []
    for n in names:
        packet, _, overload = n.partition(".")
        op = getattr(torch.ops.aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            out.append(getattr(op, overload or "default"))
    return frozenset(out)


#: outputs kept by ``"selective"``: matmuls and attention kernels (expensive to recompute)
SAVE_OPS = _ops(
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",
)


# ----------------------------------------------------------------------------- measurement state

class _Probe:
    """Bytes of saved tensors by unit during one probe forward (each storage counted once)."""

    def __init__(self, exclude: set[tuple]):
        self.seen: set[tuple] = set(exclude)
        self.per_unit: dict[str, int] = {}
        self.unit: str = ""          # "" = outside any unit

    def add(self, t: Any) -> None:
        if not isinstance(t, Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if key in self.seen or st.nbytes() == 0:
            return
        self.seen.add(key)
        self.per_unit[self.unit] = self.per_unit.get(self.unit, 0) + st.nbytes()


_PROBE: _Probe | None = None


def selective_policy(save_ops: Iterable = SAVE_OPS) -> Callable:
    """A SAC policy function: MUST_SAVE for ``save_ops``, PREFER_RECOMPUTE otherwise."""
    save = frozenset(save_ops)

    def policy(ctx, op, *args, **kwargs):
        if op in save:
            if _PROBE is not None:
                out = getattr(ctx, "op_output", None)
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    _PROBE.add(t)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


# ----------------------------------------------------------------------------- wrapping

class _Checkpointed:
    """Installed as ``module.forward``; holds the module (so deepcopy re-targets it)."""

    def __init__(self, module: nn.Module, policy: str, path: str, save_ops: Iterable = SAVE_OPS):
        self.module = module
        self.policy = policy
        self.path = path
        self.save_ops = frozenset(save_ops)
        self.inner = module.__dict__.get("forward")  # an instance-level forward someone set before
        self._context_fn = functools.partial(create_selective_checkpoint_contexts, selective_policy(save_ops))
        self.fused = _fused_paths(module) if policy == "selective" else []

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        probe = _PROBE
        prev = probe.unit if probe is not None else ""
        if probe is not None:
            probe.unit = self.path
        try:
            if self.policy == "none" or not torch.is_grad_enabled():
                return self._forward(*args, **kwargs)
            if self.policy == "full":
                return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)
            if self.fused and not _autocast_on():
                return self._fused_forward(*args, **kwargs)
            return checkpoint(self._forward, *args, use_reentrant=False, context_fn=self._context_fn, **kwargs)
        finally:
            if probe is not None:
                probe.unit = prev

    def _fused_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Selective via the modules' own fused recompute paths, switched on for this call only."""
        flags = [m.recompute_pointwise for m in self.fused]
        try:
            for m in self.fused:
                m.recompute_pointwise = True
            return self._forward(*args, **kwargs)
        finally:
            for m, flag in zip(self.fused, flags):
                m.recompute_pointwise = flag


def _autocast_on() -> bool:
    """Any autocast active: the fused paths are fp32/fp64 only, so selective falls back to torch's."""
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda", "mps"))


def _fused_paths(module: nn.Module) -> list[nn.Module]:
    """The outermost modules in ``module`` (itself included) that offer a fused recompute path."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if hasattr(m, "recompute_pointwise") and not any(name.startswith(p + ".") or p == "" for p, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def default_units(model: nn.Module) -> list[str]:
    """The module paths of ``model.blocks`` (an ``nn.ModuleList``)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError("checkpointing: the model has no `blocks` ModuleList; pass the units to wrap "
                         "(module paths or patterns)")
    return [f"blocks.{i}" for i in range(len(blocks))]


def _outermost(paths: Iterable[str]) -> list[str]:
    """Drop paths that lie inside another path of the list (module order kept)."""
    kept: list[str] = []
    for p in paths:
        if not any(p.startswith(k + ".") for k in kept):
            kept.append(p)
    return kept


def _resolve(model: nn.Module, policy: str | Mapping[str, str],
             module_filter: Iterable[str] | Callable[[str, nn.Module], bool] | None) -> dict[str, str]:
    """{module path: policy} for the modules to wrap.

    A pattern selects the outermost modules it matches (``"blocks.*"`` is every block, not also
    every submodule of a block); with a dict, the first pattern matching a module decides.
    """
    modules = {n: m for n, m in model.named_modules() if n}
    if isinstance(policy, str):
        if module_filter is None:
            paths = default_units(model)
        elif callable(module_filter):
            paths = _outermost(n for n, m in modules.items() if module_filter(n, m))
        else:
            pats = list(module_filter)
            paths = _outermost(n for n in modules if any(fnmatchcase(n, p) for p in pats))
            missing = [pat for pat in pats if not any(fnmatchcase(n, pat) for n in modules)]
            if missing:
                raise ValueError(f"checkpointing: pattern(s) {missing} match no module")
        table = {p: policy for p in paths}
    else:
        matched = _outermost(n for n in modules if any(fnmatchcase(n, pat) for pat in policy))
        table = {n: next(pol for pat, pol in policy.items() if fnmatchcase(n, pat)) for n in matched}
        missing = [pat for pat in policy if not any(fnmatchcase(n, pat) for n in modules)]
        if missing:
            raise ValueError(f"checkpointing: pattern(s) {missing} match no module")
    for path, pol in table.items():
        if pol not in POLICIES:
            raise ValueError(f"checkpointing: policy {pol!r} for {path!r}: allowed {', '.join(POLICIES)}")
    return table


def apply_checkpointing(model: nn.Module, policy: str | Mapping[str, str] = "selective",
                        module_filter: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
                        save_ops: Iterable = SAVE_OPS) -> dict[str, str]:
    """Wrap modules' forwards with a checkpoint policy; returns ``{path: policy}`` applied.

    ``policy`` is one policy for the units chosen by ``module_filter`` (default: every block of
    ``model.blocks``; or fnmatch patterns on module paths; or a ``(name, module) -> bool``), or
    a dict ``{path pattern: policy}`` (first matching pattern wins). Previous wrapping of the
    model is removed first. ``"none"`` entries leave modules unwrapped.
    """
    table = _resolve(model, policy, module_filter)
    remove_checkpointing(model)
    modules = dict(model.named_modules())
    for path, pol in table.items():
        if pol != "none":
            modules[path].forward = _Checkpointed(modules[path], pol, path, save_ops)
    return {p: pol for p, pol in table.items()}


def remove_checkpointing(model: nn.Module) -> None:
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, _Checkpointed):
            if fwd.inner is not None:
                m.forward = fwd.inner
            else:
                del m.forward


def current_policies(model: nn.Module) -> dict[str, str]:
    """``{path: policy}`` of the wrapped modules."""
    return {n: m.forward.policy for n, m in model.named_modules()
            if isinstance(m.__dict__.get("forward"), _Checkpointed)}


def _wrappers(model: nn.Module) -> dict[str, _Checkpointed]:
    return {n: m.__dict__["forward"] for n, m in model.named_modules()
            if isinstance(m.__dict__.get("forward"), _Checkpointed)}


def _restore(model: nn.Module, saved: dict[str, _Checkpointed]) -> None:
    remove_checkpointing(model)
    modules = dict(model.named_modules())
    for path, w in saved.items():
        modules[path].forward = _Checkpointed(modules[path], w.policy, path, w.save_ops)


# ----------------------------------------------------------------------------- measurement

@dataclass
class ActivationProbe:
    """Saved-activation bytes of one probe step: total, by unit, and outside any unit."""

    total: int
    per_unit: dict[str, int]
    outside: int


def measure_activations(model: nn.Module, step_fn: Callable[[nn.Module], Any],
                        policy: str | Mapping[str, str] | None = None,
                        units: Iterable[str] | None = None, save_ops: Iterable | None = None) -> ActivationProbe:
    """Run ``step_fn(model)`` (forward + loss, no backward) and measure saved-activation bytes.

    ``policy``: a plan to measure (applied for the probe only; the model's wrapping is restored
    afterwards); ``None`` measures the model as it is. ``units``: module paths whose bytes are
    reported separately (default: the plan's modules or ``model.blocks``). ``save_ops``: the
    selective policy's op list (default: the one the model is wrapped with, else SAVE_OPS).
    """
    global _PROBE
    saved = _wrappers(model)
    before = {p: w.policy for p, w in saved.items()}
    if save_ops is None:
        save_ops = next(iter(saved.values())).save_ops if saved else SAVE_OPS
    if policy is None:
        plan = dict(before)
    elif isinstance(policy, str):
        plan = _resolve(model, policy, list(units) if units is not None else None)
    else:
        plan = _resolve(model, policy, None)
    unit_paths = list(units) if units is not None else (list(plan) or default_units(model))
    for u in unit_paths:
        plan.setdefault(u, "none")
    params = {(p.device, p.untyped_storage().data_ptr()) for p in model.parameters()}
    params |= {(b.device, b.untyped_storage().data_ptr()) for b in model.buffers()}
    probe = _Probe(params)
    # wrap every unit (policy "none" too) so that saved bytes are attributed to it
    modules = dict(model.named_modules())
    nested = [p for p in plan if any(p.startswith(q + ".") for q in plan)]
    if nested:
        raise ValueError(f"checkpointing: units {nested} lie inside other units")
    remove_checkpointing(model)
    for path, pol in plan.items():
        modules[path].forward = _Checkpointed(modules[path], pol, path, save_ops)

    def pack(t: Tensor) -> Tensor:
        probe.add(t)
        return t

    try:
        _PROBE = probe
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = step_fn(model)
        del out
    finally:
        _PROBE = None
        _restore(model, saved)
    per_unit = {u: probe.per_unit.get(u, 0) for u in unit_paths}
    outside = sum(v for k, v in probe.per_unit.items() if k not in per_unit)
    return ActivationProbe(total=sum(per_unit.values()) + outside, per_unit=per_unit, outside=outside)


# ----------------------------------------------------------------------------- budget

@dataclass
class CheckpointPlan:
    """The policies chosen for a memory budget, with the probe measurements behind the choice."""

    policies: dict[str, str]
    measured_bytes: int            # saved-activation bytes of the chosen plan, measured
    budget: int
    fits: bool
    probes: dict[str, ActivationProbe] = field(default_factory=dict)   # "none" / "selective" / "full"
    importance: dict[str, float] = field(default_factory=dict)

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
                         importance: Mapping[str, float] | None = None,
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
    if importance:
        imp.update({u: float(v) for u, v in importance.items() if u in imp})
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
                          fits=measured <= memory_budget, probes=probes, importance=imp, save_ops=save_ops)


# ----------------------------------------------------------------------------- components

def component_units(model: nn.Module, components: Any, within: Iterable[str] | None = None) -> dict[str, float]:
    """Units that each belong to one component, with that component's importance.

    ``components``: a :class:`~neatlm.grad.coordinator.GradientCoordinator` or a list of
    :class:`~neatlm.grad.components.ComponentSpec`. Inside each block (``within``, default
    ``model.blocks``), the largest submodules whose parameters all belong to one component
    become units; a block owned by a single component is one unit. Parameter-free modules are
    skipped. Returns ``{module path: importance}``.
    """
    from .components import assign_parameters

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


@contextlib.contextmanager
def checkpointing(model: nn.Module, policy: str | Mapping[str, str], **kw: Any) -> Iterator[dict[str, str]]:
    """Apply a policy for the duration of a ``with`` block, then restore the previous wrapping."""
    saved = _wrappers(model)
    try:
        yield apply_checkpointing(model, policy, **kw)
    finally:
        _restore(model, saved)
