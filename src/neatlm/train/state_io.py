"""Run state as plain data: the carried model state (KV caches, memory fast weights) and the RNG.

A model state is a nest of lists, tuples, dicts, tensors, numbers, strings, None and the
project's own state classes (see the mixer protocol in :mod:`neatlm.nn.model`). These functions
walk any such nest, so a component's state is carried across segments and saved in checkpoints
without code of its own; a new state class only has to be added to :func:`state_classes`.

Loading is data only: a saved structure names its classes by their short names, and only the
classes of :func:`state_classes` are built from it. Nothing named by a file is imported or
called; anything else is a :class:`~neatlm.errors.CheckpointError`.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..nn.state_tree import is_namedtuple, map_tensors, merge_tensors


def split_rows(obj: Any, pieces: list[slice], rows: int) -> list[Any]:
    """The state of each piece of a batch's rows (``pieces`` slice the batch dimension).

    Every tensor of a model state has the batch first (the mixer protocol); a tensor whose first
    dimension is not ``rows`` would be cut wrongly, so it is refused instead. What is not a tensor
    (positions, the statistics dict of the call that made the state) is the same for every row
    and is shared, as in :func:`map_tensors`.
    """
    for t in _tensors(obj):
        if t.dim() == 0 or t.shape[0] != rows:
            raise ValueError(f"cannot split a state tensor of shape {tuple(t.shape)} into rows of a batch of {rows}")
    return [map_tensors(obj, lambda t, p=p: t[p]) for p in pieces]


def cat_rows(parts: list[Any]) -> Any:
    """The inverse of :func:`split_rows`: the pieces' states joined along the batch dimension
    (values that are not tensors are taken from the first piece)."""
    return merge_tensors(parts, lambda ts: torch.cat(ts, dim=0))


def _tensors(obj: Any) -> list[Tensor]:
    """Every tensor that :func:`map_tensors` reaches in a nest."""
    found: list[Tensor] = []
    map_tensors(obj, lambda t: found.append(t) or t)
    return found


def detach_state(obj: Any) -> Any:
    """Cut the graph between segments (truncated backprop); values are unchanged."""
    return map_tensors(obj, lambda t: t.detach())


@lru_cache(maxsize=None)
def state_classes() -> dict[str, type]:
    """The classes a saved state may contain, by name: the states of the project's mixers."""
    from ..nn.attention import AttentionState
    from ..nn.bk import BKState
    from ..nn.blt.model import BLTState
    from ..nn.blt.patching import PatchCursor
    from ..nn.memory import MemoryState
    from ..nn.memory_mixer import MemoryMixerState

    return {c.__name__: c for c in (AttentionState, BKState, MemoryState, MemoryMixerState, BLTState, PatchCursor)}


@lru_cache(maxsize=None)
def _legacy_names() -> dict[str, str]:
    """Checkpoints before the allow-list named classes as ``module:qualname``; map exactly those."""
    return {f"{c.__module__}:{c.__qualname__}": name for name, c in state_classes().items()}


def flatten_state(obj: Any, tensors: dict[str, Tensor] | None = None, prefix: str = "state") -> tuple[Any, dict[str, Tensor]]:
    """(JSON-able structure, {key: tensor}) for a checkpoint; inverse of :func:`unflatten_state`."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
        return {"tensor": prefix}, tensors
    if is_namedtuple(obj) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        name = type(obj).__name__
        if state_classes().get(name) is not type(obj):
            raise TypeError(f"cannot save state of type {type(obj).__qualname__}: not one of the state classes "
                            f"{sorted(state_classes())} (add it to neatlm.train.state_io.state_classes)")
        if is_namedtuple(obj):
            items = zip(obj._fields, obj)
        else:
            items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init)
        fields = {k: flatten_state(v, tensors, f"{prefix}.{k}")[0] for k, v in items}
        return {"dataclass": name, "fields": fields}, tensors
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)]
        return {"list" if isinstance(obj, list) else "tuple": items}, tensors
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        items = {k: flatten_state(v, tensors, f"{prefix}.{k}")[0] for k, v in obj.items()}
        return {"dict": items}, tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}, tensors
    raise TypeError(f"cannot save state of type {type(obj).__name__}")


_KINDS = ("tensor", "list", "tuple", "dict", "dataclass", "value")


def unflatten_state(structure: Any, tensors: dict[str, Tensor], device: torch.device | str = "cpu",
                    source: str = "the saved state") -> Any:
    """Rebuild a nest from :func:`flatten_state` output; builds nothing but data and state classes.

    Raises :class:`CheckpointError` (naming ``source``) on anything else.
    """
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: {what}")

    def build(s: Any) -> Any:
        if not isinstance(s, dict) or len([k for k in _KINDS if k in s]) != 1:
            raise bad(f"malformed state entry {_short(s)}")
        if "tensor" in s:
            t = tensors.get(s["tensor"]) if isinstance(s["tensor"], str) else None
            if not isinstance(t, Tensor):
                raise bad(f"the tensor {_short(s['tensor'])} is missing")
            return t.to(device)
        if "list" in s or "tuple" in s:
            items = s.get("list", s.get("tuple"))
            if not isinstance(items, list):
                raise bad(f"malformed state entry {_short(s)}")
            built = [build(v) for v in items]
            return built if "list" in s else tuple(built)
        if "dict" in s:
            if not isinstance(s["dict"], dict):
                raise bad(f"malformed state entry {_short(s)}")
            return {k: build(v) for k, v in s["dict"].items()}
        if "dataclass" in s:
            name = s["dataclass"]
            name = _legacy_names().get(name, name) if isinstance(name, str) else name
            cls = state_classes().get(name) if isinstance(name, str) else None
            if cls is None:
                raise bad(f"refusing to build {_short(s['dataclass'])}: not one of the state classes "
                          f"{sorted(state_classes())}")
            fields = s.get("fields")
            allowed = cls._fields if issubclass(cls, tuple) else [f.name for f in dataclasses.fields(cls) if f.init]
            if not isinstance(fields, dict) or not set(fields) <= set(allowed):
                raise bad(f"{name} has fields {_short(fields)}, expected {list(allowed)}")
            try:
                return cls(**{k: build(v) for k, v in fields.items()})
            except TypeError as exc:  # a required field is missing
                raise bad(f"{name}: {exc}") from None
        value = s["value"]
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise bad(f"malformed value {_short(value)}")
        return value

    try:
        return build(structure)
    except RecursionError:
        raise bad("the state is nested too deeply") from None


def _short(obj: Any, limit: int = 60) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


class CarriedState:
    """The model state kept across steps (``memory.reset = "never"``), saved as plain data."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.value: Any = None
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        structure, tensors = flatten_state(self.value)
        return {"structure": structure, "tensors": tensors}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        tensors = sd["tensors"]
        if not isinstance(tensors, dict):
            raise TypeError("the carried state's tensors are not a mapping")
        self.value = unflatten_state(sd["structure"], tensors, self.device, source="the carried model state")


class RNGState:
    """The global torch RNG states (CPU and every CUDA device) as tensors."""

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"torch": torch.get_rng_state()}
        sd["cuda"] = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        cpu, cuda = sd["torch"], sd.get("cuda") or []
        if not isinstance(cpu, Tensor) or cpu.dtype != torch.uint8 or not isinstance(cuda, list) \
                or not all(isinstance(s, Tensor) and s.dtype == torch.uint8 for s in cuda):
            raise TypeError("RNG states must be uint8 tensors")
        torch.set_rng_state(cpu.cpu())
        if cuda and torch.cuda.is_available():
            for i, s in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)
