"""Singular value fine-tuning (SVF, Transformer², Sun et al. 2025) of a trained NeatLM.

For each chosen weight matrix ``W = U diag(s) V^T`` (the SVD taken once), an expert is one vector
``z`` per matrix, and the adapted weight is

    W'(z) = U diag(s * z) V^T * sum(s) / sum(s * z)

so only the scale of each singular direction is learned (``min(out, in)`` numbers per matrix,
against ``r * (out + in)`` for a rank-``r`` LoRA) and the rescaling keeps the sum of singular
values, hence the overall scale of the layer, fixed. It is computed as ``W + U diag(s * (c z - 1))
V^T`` with ``c = sum(s) / sum(s z)``: the same matrix, but at ``z = 1`` the correction is exactly
zero, so the base model is reproduced bit for bit, not to the SVD's rounding error.

The weight becomes a ``torch.nn.utils.parametrize`` parametrization of the ``Linear``, so every
code path that reads ``linear.weight`` (the plain forward, the fused SwiGLU of the "selective"
checkpoint policy, activation checkpointing) sees ``W'(z)`` and back-propagates into ``z``. The
base weight stays in the module (``parametrizations.weight.original``) and is frozen by
:func:`attach_svf`.

The basis (``U``, ``s``, ``V^T`` per matrix) belongs to one base model; :func:`base_fingerprint`
names that model by a hash of its weights, and every expert file records it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import NeatError

Z_PATTERN = "*.parametrizations.weight.0.z"   # the coordinator pattern that claims every z vector


class SVF(nn.Module):
    """The parametrization ``W -> W'(z)`` of one weight matrix with a fixed SVD basis."""

    def __init__(self, u: Tensor, s: Tensor, vh: Tensor):
        super().__init__()
        self.register_buffer("u", u.detach().clone())
        self.register_buffer("s", s.detach().clone())
        self.register_buffer("vh", vh.detach().clone())
        self.z = nn.Parameter(torch.ones_like(s))

    def forward(self, weight: Tensor) -> Tensor:
        scale = self.s.sum() / (self.s * self.z).sum()
        correction = (self.u * (self.s * (scale * self.z - 1.0))) @ self.vh
        return weight + correction.to(weight.dtype)


@dataclass(frozen=True)
class SVFBasis:
    """The SVD of each adapted matrix: ``{module path: (U, s, V^T)}``."""

    factors: dict[str, tuple[Tensor, Tensor, Tensor]]

    @staticmethod
    def of(model: nn.Module, patterns: tuple[str, ...]) -> "SVFBasis":
        """The SVD (float64, stored in the weight's dtype) of every ``nn.Linear`` whose module path
        matches one of ``patterns``."""
        factors = {}
        for path in target_paths(model, patterns):
            weight = model.get_submodule(path).weight.detach()
            u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
            factors[path] = (u.to(weight.dtype), s.to(weight.dtype), vh.to(weight.dtype))
        return SVFBasis(factors)

    def tensors(self) -> dict[str, Tensor]:
        """Flat ``{path.u|s|vh: tensor}`` for a safetensors file."""
        out = {}
        for path, (u, s, vh) in self.factors.items():
            out.update({f"{path}.u": u.contiguous(), f"{path}.s": s.contiguous(), f"{path}.vh": vh.contiguous()})
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, Tensor]) -> "SVFBasis":
        paths = sorted({k.rsplit(".", 1)[0] for k in tensors})
        return SVFBasis({p: (tensors[f"{p}.u"], tensors[f"{p}.s"], tensors[f"{p}.vh"]) for p in paths})

    def sizes(self) -> dict[str, int]:
        """Entries of z per matrix."""
        return {path: s.numel() for path, (_, s, _) in self.factors.items()}


def target_paths(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Module paths of the ``nn.Linear`` layers that ``patterns`` (fnmatch) select; an error naming
    the patterns when they select none."""
    paths = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and any(fnmatchcase(name, p) for p in patterns)]
    if not paths:
        linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        raise NeatError(f"adapt.patterns = {','.join(patterns)!r} selects no linear layer of the model; its linear "
                        f"layers are e.g. {', '.join(linears[:4])}")
    return paths


def attach_svf(model: nn.Module, basis: SVFBasis) -> list[str]:
    """Parametrize every matrix of ``basis`` with an :class:`SVF` (z = 1) and freeze the rest of the
    model. Returns the adapted module paths. Undo with :func:`detach_svf`."""
    for p in model.parameters():
        p.requires_grad_(False)
    for path, (u, s, vh) in basis.factors.items():
        module = model.get_submodule(path)
        if parametrize.is_parametrized(module, "weight"):
            raise NeatError(f"{path}: already carries an SVF adapter")
        if tuple(module.weight.shape) != (u.shape[0], vh.shape[1]):
            raise NeatError(f"{path}: the SVF basis is for a {u.shape[0]}x{vh.shape[1]} matrix, the model's weight "
                            f"is {tuple(module.weight.shape)}")
        parametrize.register_parametrization(module, "weight", SVF(u, s, vh))
        module.parametrizations.weight.original.requires_grad_(False)
    return list(basis.factors)


def detach_svf(model: nn.Module) -> None:
    """Remove every SVF parametrization, keeping the base weights (not the adapted ones)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def svf_modules(model: nn.Module) -> dict[str, SVF]:
    """``{module path: its SVF}`` for every adapted matrix."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, SVF):
                    out[name] = p
    return out


def get_z(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every z vector, by module path."""
    return {path: m.z.detach().clone() for path, m in svf_modules(model).items()}


@torch.no_grad()
def set_z(model: nn.Module, z: dict[str, Tensor]) -> None:
    """Load z vectors (e.g. an expert, or a mixture of experts) into the adapted matrices."""
    modules = svf_modules(model)
    if set(z) != set(modules):
        missing, extra = sorted(set(modules) - set(z)), sorted(set(z) - set(modules))
        raise NeatError(f"z vectors do not match the adapted matrices (missing {missing[:3]}, unexpected {extra[:3]})")
    for path, m in modules.items():
        if z[path].shape != m.z.shape:
            raise NeatError(f"{path}: z has {tuple(z[path].shape)} entries, the matrix has {tuple(m.z.shape)}")
        m.z.copy_(z[path])


def mix(experts: list[dict[str, Tensor]], alpha: Tensor) -> dict[str, Tensor]:
    """``z = sum_k alpha_k z_k`` for every matrix (the second pass of two-pass inference)."""
    return {path: sum(float(a) * e[path] for a, e in zip(alpha, experts)) for path in experts[0]}


def base_fingerprint(state: dict[str, Tensor]) -> str:
    """A hash of a model's weights (names, shapes, bytes): which base model an expert belongs to."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def lora_parameters(basis: SVFBasis, rank: int = 4) -> int:
    """Trainable parameters of a rank-``rank`` LoRA on the same matrices, for comparison."""
    return sum(rank * (u.shape[0] + vh.shape[1]) for u, _, vh in basis.factors.values())
