"""Model state (KV caches, memory fast weights) as plain data: detach, save, restore.

A model state is a nest of lists, tuples, dataclasses, tensors, numbers and None (see the mixer
protocol in :mod:`neatlm.nn.model`). These functions walk any such nest, so a new component's
state is carried across segments and saved in checkpoints without code of its own.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch
from torch import Tensor


def map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a nest, keeping its structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if _is_namedtuple(obj):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def detach_state(obj: Any) -> Any:
    """Cut the graph between segments (truncated backprop); values are unchanged."""
    return map_tensors(obj, lambda t: t.detach())


def flatten_state(obj: Any, tensors: dict[str, Tensor] | None = None, prefix: str = "state") -> tuple[Any, dict[str, Tensor]]:
    """(JSON-able structure, {key: tensor}) for a checkpoint; inverse of :func:`unflatten_state`."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
        return {"tensor": prefix}, tensors
    if _is_namedtuple(obj):
        fields = {name: flatten_state(v, tensors, f"{prefix}.{name}")[0] for name, v in zip(obj._fields, obj)}
        return {"dataclass": _class_path(type(obj)), "fields": fields}, tensors
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)]
        return {"list" if isinstance(obj, list) else "tuple": items}, tensors
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: flatten_state(getattr(obj, f.name), tensors, f"{prefix}.{f.name}")[0]
                  for f in dataclasses.fields(obj) if f.init}
        return {"dataclass": _class_path(type(obj)), "fields": fields}, tensors
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        items = {k: flatten_state(v, tensors, f"{prefix}.{k}")[0] for k, v in obj.items()}
        return {"dict": items}, tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}, tensors
    raise TypeError(f"cannot save state of type {type(obj).__name__}")


def unflatten_state(structure: Any, tensors: dict[str, Tensor], device: torch.device | str = "cpu") -> Any:
    if "tensor" in structure:
        return tensors[structure["tensor"]].to(device)
    if "list" in structure:
        return [unflatten_state(s, tensors, device) for s in structure["list"]]
    if "tuple" in structure:
        return tuple(unflatten_state(s, tensors, device) for s in structure["tuple"])
    if "dict" in structure:
        return {k: unflatten_state(s, tensors, device) for k, s in structure["dict"].items()}
    if "dataclass" in structure:
        module, _, qualname = structure["dataclass"].partition(":")
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**{k: unflatten_state(v, tensors, device) for k, v in structure["fields"].items()})
    return structure["value"]
