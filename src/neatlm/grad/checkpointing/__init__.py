"""Activation checkpointing as a policy applied to a model, on top of ``torch.utils.checkpoint``.

Policies (per unit: a block, or any submodule such as one component inside a block):

- ``"none"``       autograd saves whatever it saves.
- ``"full"``       save only the unit's inputs; recompute the whole unit in backward.
- ``"selective"``  keep the outputs of matmul-like ops and recompute the cheap pointwise ops
                   around them. A block whose MLP is SwiGLU, or a SwiGLU, is swapped for its
                   fused counterpart (:mod:`.fused`: same children, same parameter names), whose
                   backward rebuilds norm, silu and product from the kept gate_up output
                   (:mod:`neatlm.ops.recompute`) without replaying the forward; the rest of such a
                   block (its mixer) keeps its activations. Any other unit, and a fused one where
                   the fused ops do not apply (autocast, half precision), runs under torch's
                   selective checkpointing (:mod:`.selective`), which replays every op of the unit
                   under a Python dispatch mode: slower, and for a memory mixer no better than
                   ``"full"``, which is why the fused blocks leave their mixer alone.

All use the non-reentrant implementation, so units may take extra arguments, keyword arguments
and ``None``, and may return tuples such as ``(x, state)``. Gradients equal those of ``"none"``:
bit for bit under ``"full"`` and torch's selective path (recomputation replays the same ops with
the same RNG state), within float rounding on the fused path (a hand-written backward).

Usage::

    apply_checkpointing(model, "selective")                      # every model.blocks[i]
    apply_checkpointing(model, {"blocks.0": "full", "blocks.*": "selective"})
    plan = choose_checkpointing(model, step_fn, memory_budget=200 * 2**20,
                                units=component_units(model, coordinator))
    plan.apply(model)

A unit's forward runs twice under ``"full"`` and torch's selective checkpointing (once more in
backward), so it must not mutate module state in its forward; blocks that pass state in and out
as values are fine. Torch's selective checkpointing allows one backward pass per region, so
per-component losses (``GradientCoordinator.backward({...})``, one pass per component) need
``"full"`` or ``"none"`` on the units they share where that is what runs;
:class:`SelectiveBackwardError` names the unit.

``"full"`` and torch's selective policy replace the unit's ``forward`` on the instance; the fused
swap replaces the module in its parent. Either way parameter names, state dicts and
``copy.deepcopy`` are unaffected, and :func:`remove_checkpointing` restores the modules as built.

Layout: :mod:`.policies` applies and removes policies, :mod:`.fused` holds the fused
counterparts, :mod:`.selective` is torch's selective checkpointing as used here, :mod:`.measure`
measures saved activations, :mod:`.planner` chooses policies for a memory budget.
"""

from .measure import ActivationProbe, measure_activations
from .planner import CheckpointPlan, choose_checkpointing, component_units
from .policies import POLICIES, apply_checkpointing, current_policies, default_units, remove_checkpointing
from .selective import SAVE_OPS, SelectiveBackwardError

__all__ = [
    "POLICIES", "SAVE_OPS", "ActivationProbe", "CheckpointPlan", "SelectiveBackwardError", "apply_checkpointing",
    "choose_checkpointing", "component_units", "current_policies", "default_units", "measure_activations",
    "remove_checkpointing",
]
