"""Atomic checkpoints: a directory per save, written aside and renamed into place.

Layout of ``RUN_DIR/checkpoints/step_000500/``:

- ``model.safetensors``: the weights;
- ``optimizer.pt``: optimizer state, loadable with ``torch.load(weights_only=True)``;
- ``extra.safetensors`` (optional): other tensors that must survive, e.g. memory state;
- ``state.json``: step, config, RNG states, sampler position, and a manifest of the size and
  SHA-256 of every other file, so that truncation or corruption is detected and named.

A save writes ``.tmp-step_000500``, fsyncs every file and the directory, then renames: a crash
at any point leaves either the old set of checkpoints or the new one, never a half-written
``step_*`` directory. Only after the rename are checkpoints beyond ``keep_last`` deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

PREFIX = "step_"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def save_checkpoint(run_dir: str | Path, step: int, model_tensors: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], state: dict[str, Any], keep_last: int,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
    name = f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_tensors.items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    if extra_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, str(tmp / "extra.safetensors"))
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "files": manifest}, indent=1))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    final = root / name
    if final.exists():  # re-saving a step after a resume: move the old one out of the way first
        old = root / f".tmp-old-{name}"
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    _fsync(root)
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def resolve(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory itself."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no checkpoints in {checkpoint_root(path)}")
    return found[-1]


def _previous_hint(ckpt: Path) -> str:
    run_dir = ckpt.parent.parent
    earlier = [p for p in list_checkpoints(run_dir) if p.name < ckpt.name]
    return f"; the previous checkpoint is intact: --resume {earlier[-1]}" if earlier else ""


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Return (model tensors, optimizer state, state dict, extra tensors), verifying every file."""
    ckpt = resolve(path)
    state_file = ckpt / "state.json"
    try:
        state = json.loads(state_file.read_text())
        manifest = state["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{state_file} is unreadable or corrupted ({exc}){_previous_hint(ckpt)}") from None
    for name, meta in manifest.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing{_previous_hint(ckpt)}")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{f} is truncated ({size} of {meta['bytes']} bytes){_previous_hint(ckpt)}")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} is corrupted (checksum mismatch){_previous_hint(ckpt)}")
    try:
        model = load_file(str(ckpt / "model.safetensors"))
        optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        extra = load_file(str(ckpt / "extra.safetensors")) if "extra.safetensors" in manifest else {}
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{ckpt}: cannot load ({exc}){_previous_hint(ckpt)}") from None
    return model, optimizer, state, extra
