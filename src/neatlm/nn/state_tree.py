"""Walking a model state: a nest of lists, tuples, dicts, tensors, numbers and the project's state
dataclasses (the mixer protocol's states). The trainer carries, cuts and saves states with these
(``neatlm.train.state_io``); a model that runs some rows of a batch apart (BLT's global model over
ragged patch rows) selects and joins rows with them."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import Tensor


def is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in a nest, keeping its structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if is_namedtuple(obj):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def merge_tensors(objs: list[Any], fn: Callable[[list[Tensor]], Tensor]) -> Any:
    """Apply ``fn`` to the list of corresponding tensors of nests of one structure (values that are
    not tensors are taken from the first nest)."""
    first = objs[0]
    if isinstance(first, Tensor):
        return fn(objs)
    if is_namedtuple(first):
        return type(first)(*(merge_tensors(list(vs), fn) for vs in zip(*objs)))
    if isinstance(first, (list, tuple)):
        return type(first)(merge_tensors(list(vs), fn) for vs in zip(*objs))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: merge_tensors([getattr(o, f.name) for o in objs], fn)
                                             for f in dataclasses.fields(first) if f.init})
    return first
