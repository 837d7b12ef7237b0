"""A trained run opened for adaptation: its model with SVF attached, and its experts.

:func:`open_base` reads a run's verified weights, takes (or reuses) the SVD basis of the adapted
matrices, and returns an :class:`AdaptedModel` whose z vectors start at 1 (the base model).
Experts are loaded into it with :meth:`AdaptedModel.load_expert` and mixed with
:func:`neatlm.adapt.svf.mix`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import Config, from_dict
from ..errors import NeatError
from ..nn.model import NeatLM
from ..train import checkpoint as ckpt
from . import files
from .svf import SVFBasis, attach_svf, base_fingerprint, get_z, set_z


@dataclass
class AdaptedModel:
    """A base run's model with an SVF adapter on each matrix of ``basis`` (others frozen)."""

    model: NeatLM
    cfg: Config
    run_dir: Path
    fingerprint: str            # of the base weights: every expert file records it
    basis: SVFBasis

    def ones(self) -> dict[str, Tensor]:
        """z = 1 everywhere: the base model exactly."""
        return {path: torch.ones_like(s) for path, (_, s, _) in self.basis.factors.items()}

    def load_expert(self, name: str) -> dict[str, Tensor]:
        """An expert's z vectors (checked: same base model, same matrices)."""
        path = files.expert_file(self.run_dir, files.check_name(name))
        if not path.is_file():
            known = files.expert_names(self.run_dir)
            raise NeatError(f"no expert {name!r} beside {self.run_dir} (experts: {', '.join(known) or 'none yet'}; "
                            "train one with `neat adapt`)")
        z, _ = files.read(path, "svf-expert", self.fingerprint)
        self.check_matrices(path, z)
        return z

    def check_matrices(self, path: Path, z: dict[str, Tensor]) -> None:
        sizes = self.basis.sizes()
        for name, size in sizes.items():
            if name not in z or z[name].shape != (size,):
                raise NeatError(f"{path}: no z vector of {size} entries for {name} (it was made with other "
                                "adapt.patterns)")

    def save_expert(self, name: str, z: dict[str, Tensor], meta: dict) -> Path:
        return files.write(files.expert_file(self.run_dir, name), z,
                           {**meta, "kind": "svf-expert", "base": self.fingerprint, "name": name})

    def current_z(self) -> dict[str, Tensor]:
        return get_z(self.model)

    def use(self, z: dict[str, Tensor]) -> None:
        """Run the model with these z vectors from now on."""
        set_z(self.model, z)


def run_dir_of(run: str | Path) -> Path:
    """The run directory of ``--run`` (a run directory, or one of its checkpoint directories)."""
    path = Path(run)
    return path.parent.parent if (path / ckpt.STATE_FILE).is_file() else path


def open_base(run: str | Path, patterns: tuple[str, ...], device: torch.device | str = "cpu") -> AdaptedModel:
    """Open the run for adaptation. A model trained with full attention gets its training context as
    a sliding window (same weights, same outputs within the context), so documents longer than the
    context are read with bounded state. The SVD basis is computed on first use and saved in
    ``RUN_DIR/adapt/basis.safetensors``; later calls read it (and refuse other ``patterns``)."""
    found = ckpt.read_checkpoint(run)            # every file verified, weights checked against the config
    cfg = from_dict(found.config)
    if cfg.blt.enabled:
        raise NeatError(f"{run}: a BLT run; Transformer² adaptation works on byte models (NeatLM) only")
    if cfg.model.window == 0:   # full attention: read documents longer than its context in a window of it
        cfg.model.window = cfg.model.context
    model = NeatLM(cfg)
    model.load_state_dict(found.states["model"])
    fingerprint = base_fingerprint(found.states["model"])
    run_dir = run_dir_of(run)
    basis_path = files.basis_file(run_dir)
    if basis_path.is_file():
        tensors, meta = files.read(basis_path, "svf-basis", fingerprint)
        basis = SVFBasis.from_tensors(tensors)
        if tuple(meta.get("patterns", ())) != tuple(patterns):
            raise NeatError(f"{basis_path} adapts the layers {','.join(meta.get('patterns', ()))!r}, not "
                            f"adapt.patterns = {','.join(patterns)!r}: every expert of a run adapts the same "
                            f"matrices (remove {files.adapt_dir(run_dir)} to start over with other patterns)")
    else:
        basis = SVFBasis.of(model, patterns)
        files.write(basis_path, basis.tensors(), {"kind": "svf-basis", "base": fingerprint,
                                                   "patterns": list(patterns)})
    attach_svf(model, basis)
    return AdaptedModel(model.to(device), cfg, run_dir, fingerprint, basis)


def split_patterns(text: str) -> tuple[str, ...]:
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise NeatError("adapt.patterns is empty: name at least one linear layer pattern, e.g. '*.mlp.down'")
    return patterns
