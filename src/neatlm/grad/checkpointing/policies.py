"""Applying and removing policies: which modules are units, and what runs in their place."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fused import FusedModule, fused_counterpart
from .selective import SAVE_OPS, selective_contexts

POLICIES = ("none", "full", "selective")

ModuleFilter = Iterable[str] | Callable[[str, nn.Module], bool] | None


class Recompute:
    """How a checkpointed unit runs ``fn``: ``"full"`` or torch's ``"selective"`` (non-reentrant).

    Without grad there is nothing to save and ``fn`` runs as it is. ``observe`` (set only while
    measuring) is handed the outputs the selective cache keeps.
    """

    def __init__(self, policy: str, save_ops: Iterable = SAVE_OPS, observe: Callable[[Any], None] | None = None,
                 where: str = ""):
        self.policy = policy
        self.save_ops = frozenset(save_ops)
        self.observe = observe
        self.where = where   # the unit's path, for errors

    def _contexts(self):
        return selective_contexts(self.save_ops, self.observe, self.where)

    def __call__(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        if self.policy == "full":
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=self._contexts, **kwargs)


class _Checkpointed:
    """Installed as ``module.forward``; holds the module (so deepcopy re-targets it)."""

    def __init__(self, module: nn.Module, run: Recompute):
        self.module = module
        self.run = run
        self.inner = module.__dict__.get("forward")  # an instance-level forward someone set before

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self._forward, *args, **kwargs)


# ----------------------------------------------------------------------------- units

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


def resolve(model: nn.Module, policy: str | Mapping[str, str], module_filter: ModuleFilter = None) -> dict[str, str]:
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


# ----------------------------------------------------------------------------- apply / remove

def install(model: nn.Module, path: str, policy: str, save_ops: Iterable = SAVE_OPS,
            observe: Callable[[Any], None] | None = None) -> None:
    """Put one unit under ``policy`` (``"none"``: leave it as it is).

    ``"selective"`` on a module with a fused counterpart swaps that in (same children, same
    parameter names); any other policy replaces the unit's ``forward`` on the instance.
    """
    if policy == "none":
        return
    module = model.get_submodule(path)
    run = Recompute(policy, save_ops, observe, where=path)
    fused = fused_counterpart(module) if policy == "selective" else None
    if fused is not None:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, fused(module, run))
    else:
        module.forward = _Checkpointed(module, run)


def applied(model: nn.Module) -> dict[str, Recompute]:
    """``{path: how it runs}`` of the units under a policy."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, FusedModule):
            out[path] = m.run
        elif isinstance(m.__dict__.get("forward"), _Checkpointed):
            out[path] = m.__dict__["forward"].run
    return out


def reinstall(model: nn.Module, units: Mapping[str, Recompute]) -> None:
    """Remove every policy, then put back ``units`` (as returned by :func:`applied`)."""
    remove_checkpointing(model)
    for path, run in units.items():
        install(model, path, run.policy, run.save_ops)


def apply_checkpointing(model: nn.Module, policy: str | Mapping[str, str] = "selective",
                        module_filter: ModuleFilter = None, save_ops: Iterable = SAVE_OPS) -> dict[str, str]:
    """Put units under a checkpoint policy; returns ``{path: policy}`` applied.

    ``policy`` is one policy for the units chosen by ``module_filter`` (default: every block of
    ``model.blocks``; or fnmatch patterns on module paths; or a ``(name, module) -> bool``), or
    a dict ``{path pattern: policy}`` (first matching pattern wins). Policies applied before are
    removed first (and kept if the request is invalid). ``"none"`` entries leave modules as
    they are.
    """
    before = applied(model)
    remove_checkpointing(model)
    try:
        table = resolve(model, policy, module_filter)
    except ValueError:
        reinstall(model, before)
        raise
    for path, pol in table.items():
        install(model, path, pol, save_ops)
    return table


def remove_checkpointing(model: nn.Module) -> None:
    """Undo every policy on ``model``: the original modules are back and run as built."""
    for path, m in list(model.named_modules()):
        if isinstance(m, FusedModule) and path:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, m.original)
            continue
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, _Checkpointed):
            if fwd.inner is not None:
                m.forward = fwd.inner
            else:
                del m.forward


def current_policies(model: nn.Module) -> dict[str, str]:
    """``{path: policy}`` of the units under a policy."""
    return {path: run.policy for path, run in applied(model).items()}
