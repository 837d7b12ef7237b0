"""Where a base run keeps its adaptation files, and how they are written and read.

    RUN_DIR/adapt/basis.safetensors           the SVD of the adapted matrices (computed once)
    RUN_DIR/adapt/experts/NAME.safetensors    one expert: a z vector per matrix
    RUN_DIR/adapt/classifier.safetensors      the classifier expert of two-pass inference

Every file is safetensors (tensors and string metadata only: nothing in it is executed) and
records the fingerprint of the base model's weights, so an expert trained for another base model
is refused with a message naming both. Files are written atomically (a temporary file, fsync,
rename), so a killed ``neat adapt`` leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import NeatError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def adapt_dir(run_dir: Path) -> Path:
    return run_dir / "adapt"


def basis_file(run_dir: Path) -> Path:
    return adapt_dir(run_dir) / "basis.safetensors"


def expert_file(run_dir: Path, name: str) -> Path:
    return adapt_dir(run_dir) / "experts" / f"{name}.safetensors"


def classifier_file(run_dir: Path) -> Path:
    return adapt_dir(run_dir) / "classifier.safetensors"


def expert_names(run_dir: Path) -> list[str]:
    """The experts saved beside a run, sorted by name."""
    folder = adapt_dir(run_dir) / "experts"
    return sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []


def check_name(name: str) -> str:
    """An expert name is a file stem: letters, digits, ``_ . -``, at most 64 characters."""
    if not NAME_PATTERN.fullmatch(name):
        raise NeatError(f"expert name {name!r}: an expert name is 1-64 letters, digits, '_', '.' or '-', starting with "
                        "a letter or digit")
    return name


def write(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` with ``meta`` (JSON-encoded values) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read(path: Path, kind: str, base: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of a file of ``kind`` written for the base model ``base`` (fingerprint);
    a one-line error for a missing, damaged or foreign file."""
    if not path.is_file():
        raise NeatError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in raw.items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise NeatError(f"{path}: not a readable adaptation file ({str(exc).splitlines()[0][:200]})") from None
    if meta.get("kind") != kind:
        raise NeatError(f"{path}: holds {meta.get('kind')!r}, expected {kind!r}")
    if meta.get("base") != base:
        raise NeatError(f"{path} was made for base model {meta.get('base')}, but this run's weights are {base}: "
                        "train it again on this run with `neat adapt`")
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise NeatError(f"{path}: tensor {name} holds non-finite values")
    return tensors, meta
