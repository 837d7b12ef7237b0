"""Atomic checkpoints: a directory per save, written aside and renamed into place.

The trainer hands :func:`save_checkpoint` its stateful objects by name (each has
``state_dict()`` / ``load_state_dict()``) and gets them back filled from :meth:`Checkpoint.restore`;
this module decides where each part goes. Layout of ``RUN_DIR/checkpoints/step_0000500/``:

- ``model.safetensors``: the ``model`` state (the weights);
- ``optimizer.pt``: the ``optimizer`` state (optimizers, schedules, guard and monitor state):
  tensors and plain containers only, loaded with ``torch.load(weights_only=True)``;
- ``extra.safetensors``: every tensor of the other states (RNG, carried memory state), keyed
  ``<state>/<path>``;
- ``state.json``: the schema version, the step, the config, the resolved hardware, the small
  data of the other states (their tensors replaced by ``{"__tensor__": key}``), and a manifest of
  the size and SHA-256 of every other file, so that truncation or corruption is detected and named.

A save writes ``.tmp-step_0000500``, fsyncs every file and the directory, then renames: a crash
(or a full disk) at any point leaves either the old set of checkpoints or the new one, never a
half-written ``step_*`` directory. Only after the rename are checkpoints beyond ``keep_last``
deleted.

Loading runs no code from the files: safetensors and JSON are data, ``optimizer.pt`` is read
with ``weights_only=True``, and the carried state builds only its allow-listed classes
(:mod:`neatlm.train.state_io`). Every problem is a one-line :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

PREFIX = "step_"
SCHEMA = 2  # version of this layout; a checkpoint without one is the layout before versions (1)
MODEL_FILE, OPTIMIZER_FILE, EXTRA_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "extra.safetensors", "state.json"
_TENSOR = "__tensor__"
_RESERVED = ("schema", "step", "states", "files")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run (``step_<n>``), oldest first; other entries are ignored."""
    root = checkpoint_root(run_dir)
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise CheckpointError(f"{root}: cannot list checkpoints ({exc.strerror or exc})") from None
    found = [(int(m[1]), p) for p in entries
             if (m := re.fullmatch(rf"{PREFIX}(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# ----------------------------------------------------------------------------- saving

def _split(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of a state dict, its tensors moved to ``tensors`` under path keys."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors of the checkpoint would be stored as {key!r}")
        tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{key}: state dict keys must be strings")
        return {k: _split(v, f"{key}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: cannot store {type(obj).__name__} in a checkpoint")


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _remove_stale(root: Path) -> None:
    """Leftovers of a crashed save; a checkpoint moved aside for a re-save goes back into place."""
    for stale in root.glob(".tmp-*"):
        if stale.name.startswith(".tmp-old-") and stale.is_dir() and not (root / stale.name[9:]).exists():
            stale.rename(root / stale.name[9:])
        else:
            _remove(stale)


def _replace(tmp: Path, final: Path) -> None:
    old = final.with_name(f".tmp-old-{final.name}") if final.exists() else None
    if old is not None:  # re-saving a step (after resuming from an earlier checkpoint)
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, states: Mapping[str, Stateful], keep_last: int,
                    meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``states`` (``model`` and ``optimizer`` are required) and ``meta`` (JSON data, e.g.
    the config) as checkpoint ``step``; keep the last ``keep_last`` checkpoints.

    On any OSError (a full disk, a lost mount) the partial directory is removed, the existing
    checkpoints are untouched, and a one-line :class:`CheckpointError` says so.
    """
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}"
    meta = dict(meta or {})
    if any(k in meta for k in _RESERVED):
        raise ValueError(f"checkpoint meta may not use the keys {_RESERVED}")
    model = _cpu(states["model"].state_dict())
    optimizer = states["optimizer"].state_dict()
    extra: dict[str, torch.Tensor] = {}
    small = {name: _split(obj.state_dict(), name, extra) for name, obj in states.items()
             if name not in ("model", "optimizer")}
    previous = list_checkpoints(run_dir)
    renamed = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp.mkdir()
        save_file(model, str(tmp / MODEL_FILE))
        torch.save(optimizer, tmp / OPTIMIZER_FILE)
        if extra:
            save_file(_cpu(extra), str(tmp / EXTRA_FILE))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}
        document = {"schema": SCHEMA, "step": step, **meta, "states": small, "files": manifest}
        (tmp / STATE_FILE).write_text(json.dumps(document, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        _replace(tmp, final)
        renamed = True
        _fsync(root)
    except OSError as exc:
        if renamed:  # in place: only the sync of the directory failed
            raise CheckpointError(f"checkpoint {final} was written but not synced to disk "
                                  f"({exc.strerror or exc})") from None
        shutil.rmtree(tmp, ignore_errors=True)
        kept = (f"the last checkpoint ({previous[-1]}) is intact: resume from it with "
                f"`neat train --resume {Path(run_dir)}` once the problem is fixed") if previous else \
            "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {final}: {exc.strerror or exc}; nothing was written, "
                              f"{kept}") from None
    except BaseException:  # e.g. a second Ctrl-C: no partial directory is left behind either
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        try:
            shutil.rmtree(stale)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {final} was written, but the old checkpoint {stale} could not be "
                                  f"deleted ({exc.strerror or exc})") from None
    return final


# ----------------------------------------------------------------------------- loading

def resolve(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory itself."""
    path = Path(path)
    if (path / STATE_FILE).is_file() or (path.is_dir() and re.fullmatch(rf"{PREFIX}\d+", path.name)):
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no checkpoints in {checkpoint_root(path)}")
    return found[-1]


def _previous_hint(ckpt: Path) -> str:
    run_dir = ckpt.parent.parent
    try:
        earlier = [p for p in list_checkpoints(run_dir) if int(p.name[len(PREFIX):]) < int(ckpt.name[len(PREFIX):])]
    except (CheckpointError, ValueError):
        return ""
    return f"; the previous checkpoint is intact: --resume {earlier[-1]}" if earlier else ""


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error message, cut to ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Checkpoint:
    """A verified checkpoint: every file matched its manifest and every part was read as data."""

    path: Path
    step: int
    config: dict[str, Any]
    hardware: dict[str, Any]          # {"device": "cpu", "precision": "fp32"} as resolved by the run
    states: dict[str, Any]            # name -> state dict (tensors in place), "model" and "optimizer" too
    document: dict[str, Any] = field(repr=False)  # state.json as read
    extra: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def file_of(self, name: str) -> Path:
        return self.path / {"model": MODEL_FILE, "optimizer": OPTIMIZER_FILE}.get(name, STATE_FILE)

    def restore(self, objects: Mapping[str, Stateful]) -> None:
        """Hand each object its saved state; a missing or unfitting part is a CheckpointError."""
        for name, obj in objects.items():
            file = self.file_of(name)
            if name not in self.states:
                raise CheckpointError(f"{file}: no {name!r} state in this checkpoint")
            sd = self.states[name]
            if name == "model":
                check_weights(obj.state_dict(), sd, file, "the model of this run")
            try:
                obj.load_state_dict(sd)
            except CheckpointError as exc:
                if str(file) in str(exc):
                    raise
                raise CheckpointError(f"{file}: {exc}") from None
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
                if isinstance(exc, KeyError):
                    raise CheckpointError(f"{file}: the {name!r} state is incomplete (no {exc} entry)") from None
                raise CheckpointError(f"{file}: the {name!r} state does not fit this run ({_first_line(exc)})") from None


def check_weights(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], file: Path | str,
                  against: str) -> None:
    """Same tensor names and shapes as ``expected`` (the model ``against`` names), or a one-line
    error naming the file and the first difference."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        first = (f"the model has {missing[0]}, which the file lacks" if missing
                 else f"the file has {unexpected[0]}, which the model lacks")
        more = len(missing) + len(unexpected) - 1
        raise CheckpointError(f"{file} does not match {against}: {first}" + (f" ({more} more differences)" if more else ""))
    for k, t in expected.items():
        if tuple(found[k].shape) != tuple(t.shape):
            shape = lambda s: "x".join(map(str, s)) or "scalar"  # noqa: E731
            raise CheckpointError(f"{file} does not match {against}: {k} is {shape(found[k].shape)} there but "
                                  f"{shape(t.shape)} in the model (a checkpoint of another model size?)")


def _model_of_config(config: dict[str, Any], state_file: Path) -> dict[str, torch.Tensor]:
    """Parameter shapes of the model the saved config builds (on the meta device: no memory, no RNG)."""
    from ..config import from_dict
    from ..nn.build import build_model
    from ..settings import ConfigError

    try:
        cfg = from_dict(config)
    except ConfigError as exc:
        raise CheckpointError(f"{state_file}: the saved config is invalid: {exc}") from None
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_model(cfg).state_dict()


def _join(obj: Any, tensors: Mapping[str, torch.Tensor], file: Path) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            t = tensors.get(obj[_TENSOR]) if isinstance(obj[_TENSOR], str) else None
            if t is None:
                raise CheckpointError(f"{file}: the tensor {obj[_TENSOR]!r} is not in {EXTRA_FILE}")
            return t
        return {k: _join(v, tensors, file) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors, file) for v in obj]
    return obj


def _from_schema_1(doc: dict[str, Any], extra: dict[str, torch.Tensor], file: Path) -> tuple[dict, dict]:
    """(states, hardware) of a checkpoint written before schema versions."""
    import base64

    def rng(text: Any) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    try:
        states = {"progress": {"step": doc["step"], "best_val": doc.get("best_val", math.inf), "elapsed_s": 0.0},
                  "sampler": {"position": doc["sampler_position"]},
                  "rng": {"torch": rng(doc["rng"]["torch"]), "cuda": [rng(s) for s in doc["rng"].get("cuda", [])]},
                  "carry": {"structure": doc.get("carry") or {"value": None}, "tensors": dict(extra)}}
        hardware = {"device": torch.device(doc["device"]).type, "precision": doc["precision"]} \
            if "device" in doc and "precision" in doc else {}
    except KeyError as exc:
        raise CheckpointError(f"{file}: no {exc} entry (an incomplete checkpoint)") from None
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: malformed ({_first_line(exc)})") from None
    return states, hardware


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Verify and read a checkpoint (a run directory means its latest); restores nothing."""
    ckpt = resolve(path)
    hint = _previous_hint(ckpt)
    state_file = ckpt / STATE_FILE
    try:
        doc = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_file} is missing{hint}") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{state_file} is unreadable or corrupted ({_first_line(exc)}){hint}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{state_file} is corrupted (not a JSON object){hint}")
    schema = doc.get("schema", 1)
    if not _is_int(schema) or schema < 1:
        raise CheckpointError(f"{state_file}: schema {schema!r} is not a checkpoint schema version")
    if schema > SCHEMA:
        raise CheckpointError(f"{state_file}: schema {schema} is newer than this neatlm reads (up to {SCHEMA}); "
                              "upgrade neatlm to load it")
    for key, ok, what in (("files", lambda v: isinstance(v, dict), "a manifest"),
                          ("step", lambda v: _is_int(v) and v >= 0, "a step"),
                          ("config", lambda v: isinstance(v, dict), "a config")):
        if key not in doc:
            what = "no saved config" if key == "config" else f"no {key!r} entry"
            raise CheckpointError(f"{state_file}: {what} (an incomplete checkpoint){hint}")
        if not ok(doc[key]):
            raise CheckpointError(f"{state_file}: the {key!r} entry is not {what}{hint}")
    manifest = doc["files"]
    for required in (MODEL_FILE, OPTIMIZER_FILE):
        if required not in manifest:
            raise CheckpointError(f"{state_file}: the manifest does not list {required}{hint}")
    for name, meta in manifest.items():
        f = ckpt / name
        if "/" in name or "\\" in name or name in ("", ".", "..") or not isinstance(meta, dict) \
                or not _is_int(meta.get("bytes")) or not isinstance(meta.get("sha256"), str):
            raise CheckpointError(f"{state_file}: malformed manifest entry {name!r}{hint}")
        if not f.is_file():
            raise CheckpointError(f"{f} is missing{hint}")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{f} is truncated ({size} of {meta['bytes']} bytes){hint}")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} is corrupted (checksum mismatch){hint}")

    def load(name: str, fn: Callable[[Path], Any]) -> Any:
        try:
            return fn(ckpt / name)
        except pickle.UnpicklingError:  # weights_only met bytes or objects that are not plain data
            raise CheckpointError(f"{ckpt / name}: cannot be read as plain tensor data (a safe load refused "
                                  "what it holds); nothing in it was run") from None
        except Exception as exc:  # noqa: BLE001 - whatever the reader raises, the file is not a checkpoint part
            raise CheckpointError(f"{ckpt / name}: cannot be read as a checkpoint file ({_first_line(exc)})") from None

    model = load(MODEL_FILE, lambda f: load_file(str(f)))
    optimizer = load(OPTIMIZER_FILE, lambda f: torch.load(f, weights_only=True, map_location="cpu"))
    if not isinstance(optimizer, dict):
        raise CheckpointError(f"{ckpt / OPTIMIZER_FILE}: not an optimizer state (a {type(optimizer).__name__})")
    extra = load(EXTRA_FILE, lambda f: load_file(str(f))) if EXTRA_FILE in manifest else {}
    check_weights(_model_of_config(doc["config"], state_file), model, ckpt / MODEL_FILE,
                  f"the config in {state_file}")
    if schema == 1:
        states, hardware = _from_schema_1(doc, extra, state_file)
    else:
        states, hardware = doc.get("states"), doc.get("hardware", {})
        if not isinstance(states, dict) or not all(isinstance(v, dict) for v in states.values()):
            raise CheckpointError(f"{state_file}: the 'states' entry is missing or malformed{hint}")
        if not isinstance(hardware, dict):
            raise CheckpointError(f"{state_file}: the 'hardware' entry is malformed")
        states = _join(states, extra, state_file)
    states = {**states, "model": model, "optimizer": optimizer}
    return Checkpoint(ckpt, doc["step"], doc["config"], hardware, states, doc, extra)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(model tensors, optimizer state, state.json, extra tensors), every file verified; the weights
    are checked against the saved config, so they load into ``NeatLM(from_dict(state["config"]))``."""
    ck = read_checkpoint(path)
    return ck.states["model"], ck.states["optimizer"], ck.document, ck.extra
