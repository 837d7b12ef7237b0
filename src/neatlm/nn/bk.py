"""BKMixer: a sequence mixer built on the BK-Core tridiagonal resolvent.

Each head ``h`` treats the sequence as a 1-D chain with Hamiltonian ``H_h`` (tridiagonal):
on-site potential ``v_t = h0_h + v_max * tanh(W_v x_t)`` and hopping ``b_t = c_t =
hop_h * sigmoid(W_b x_t)`` between positions ``t`` and ``t+1`` (computed from the left token).
The head reads the diagonal of the resolvent ``G = (H_h - z_h)^-1`` at a learned complex energy
``z_h`` (``Im z_h >= min_imag``) and the features ``Im(z_h) * [Re G_tt, Im G_tt]`` (bounded by 1
in absolute value) are projected back to the model width.

``causal=True`` (the default, and the only choice for a language model) uses the resolvent of the
leading principal submatrix, ``G_tt = [(H_{0..t} - z)^-1]_tt = 1/d_t``: output ``t`` depends on
tokens ``0..t`` only. Its state is the forward-scan value ``d`` at the last position, the coupling
``beta = b c`` of the last position to the next one, and the number of tokens seen, so a sequence
split anywhere (down to one token at a time) gives the same outputs as one call.

``causal=False`` uses the full resolvent, which sees the whole sequence (every output depends on
every token): an ablation or encoder setting only, with no state to carry.

The protocol is the project's mixer protocol: ``y, state = mixer(x, state)``, ``x``/``y`` of shape
(B, T, D), ``state=None`` for a fresh sequence. The returned state stays in the autograd graph;
detach it for truncated backpropagation through time.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.bk_resolvent import PRECISIONS, bk_resolvent_diag


class BKState(NamedTuple):
    d: Tensor      # (B, H) complex: forward-scan value d at the last position seen
    beta: Tensor   # (B, H) real: coupling b c of the last position to the next one
    pos: int       # tokens seen so far in this sequence


class BKMixer(nn.Module):
    """Sequence mixer: (B, T, D) -> (B, T, D) through ``heads`` tridiagonal resolvents.

    Args:
        dim: model width D.
        causal: leading-submatrix resolvent (no future leak); ``False`` sees the whole sequence.
        heads: independent resolvent chains; 0 means ``max(1, dim // 16)``.
        v_max: bound of the input-dependent potential, ``|v - h0| < v_max``.
        min_imag: floor on ``Im z`` (keeps ``|G| <= 1 / Im z`` and the scans well away from 0).
        precision: ``"complex128"``, ``"complex64"`` or ``"mixed"`` (see :mod:`neatlm.ops.bk_resolvent`).
        grad_blend: ablation knob of the op; 0 is the exact gradient.
        init_std: std of the normal init of the projections; ``out_proj`` gets ``init_std * out_scale``.
    """

    def __init__(self, dim: int, causal: bool = True, heads: int = 0, v_max: float = 3.0,
                 min_imag: float = 0.05, precision: str = "complex128", grad_blend: float = 0.0,
                 init_std: float = 0.02, out_scale: float = 1.0):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: allowed values are {', '.join(PRECISIONS)}")
        if min_imag <= 0:
            raise ValueError(f"min_imag={min_imag}: must be > 0")
        self.dim, self.causal = dim, causal
        self.heads = heads or max(1, dim // 16)
        self.v_max, self.min_imag = float(v_max), float(min_imag)
        self.precision, self.grad_blend = precision, float(grad_blend)
        self.init_std, self.out_scale = float(init_std), float(out_scale)
        h = self.heads
        self.to_potential = nn.Linear(dim, h)
        self.to_hopping = nn.Linear(dim, h)
        self.h0 = nn.Parameter(torch.empty(h))        # on-site energy, folded into v
        self.hop = nn.Parameter(torch.empty(h))       # softplus -> hopping strength
        self.energy = nn.Parameter(torch.empty(h))    # Re z
        self.gamma = nn.Parameter(torch.empty(h))     # Im z = min_imag + softplus(gamma)
        self.out_proj = nn.Linear(2 * h, dim)
        self.reset_parameters()

    @classmethod
    def from_config(cls, dim: int, cfg: Any, init_std: float = 0.02, out_scale: float = 1.0) -> "BKMixer":
        """Build from a :class:`neatlm.config.BKConfig` (``init_std``/``out_scale`` as in the model)."""
        return cls(dim, causal=cfg.causal, heads=cfg.heads, v_max=cfg.v_max, min_imag=cfg.min_imag,
                   precision=cfg.precision, grad_blend=cfg.grad_blend, init_std=init_std, out_scale=out_scale)

    def reset_parameters(self) -> None:
        h = self.heads
        for lin in (self.to_potential, self.to_hopping, self.out_proj):
            std = self.init_std * (self.out_scale if lin is self.out_proj else 1.0)
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.h0)
        nn.init.constant_(self.hop, math.log(math.e - 1.0))               # softplus = 1
        with torch.no_grad():
            # energies spread over the band [-2, 2] of the free chain; widths from 0.1 to 1
            self.energy.copy_(torch.linspace(-2.0, 2.0, h) if h > 1 else torch.zeros(1))
            imag = torch.logspace(-1.0, 0.0, h) if h > 1 else torch.full((1,), 0.5)
            self.gamma.copy_(torch.log(torch.expm1((imag - self.min_imag).clamp_min(1e-3))))

    def spectral_z(self) -> Tensor:
        """(H,) complex energies with ``Im z >= min_imag`` (complex64 only for precision="complex64")."""
        dt = torch.float32 if self.precision == "complex64" else torch.float64
        return torch.complex(self.energy.to(dt), (self.min_imag + F.softplus(self.gamma)).to(dt))

    def forward(self, x: Tensor, state: BKState | None = None, ttl: object = None) -> tuple[Tensor, BKState | None]:
        """x: (B, T, D) -> y: (B, T, D), state (causal) or None (non-causal). ``ttl`` (the mixer
        protocol's test-time-learning control) has nothing to act on here."""
        B, T, _ = x.shape
        v = (self.h0 + self.v_max * torch.tanh(self.to_potential(x))).transpose(1, 2)    # (B, H, T)
        b = (F.softplus(self.hop) * torch.sigmoid(self.to_hopping(x))).transpose(1, 2)   # (B, H, T)
        z = self.spectral_z()
        if self.causal:
            init = None if state is None else (state.d, state.beta)
            G = bk_resolvent_diag(v, b[..., :-1], b[..., :-1], z, causal=True, grad_blend=self.grad_blend,
                                  precision=self.precision, init=init)
            new_state = BKState(d=G[..., -1].reciprocal(), beta=b[..., -1] * b[..., -1],
                                pos=(0 if state is None else state.pos) + T)
        else:
            if state is not None:
                raise ValueError("BKMixer(causal=False) sees the whole sequence and cannot continue one; "
                                 "pass state=None")
            G = bk_resolvent_diag(v, b[..., :-1], b[..., :-1], z, causal=False, grad_blend=self.grad_blend,
                                  precision=self.precision)
            new_state = None
        scale = z.imag.to(G.real.dtype)[:, None]                                           # (H, 1)
        feats = torch.cat((G.real * scale, G.imag * scale), 1).transpose(1, 2).to(x.dtype)  # (B, T, 2H)
        return self.out_proj(feats), new_state

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, causal={self.causal}, v_max={self.v_max}, "
                f"min_imag={self.min_imag}, precision={self.precision!r}, grad_blend={self.grad_blend}")
