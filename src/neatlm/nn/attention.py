"""Causal self-attention with RoPE and an optional sliding window, carrying a KV cache as state.

Mixer protocol (shared by every sequence mixer in neatlm)::

    y, state = mixer(x, state)      # x, y: (batch, time, dim); state=None starts a sequence

Running ``x[:, :a]`` then ``x[:, a:]`` with the returned state equals running ``x`` at once:
the state holds the keys and values a later token may still attend to (the last ``window``
of them, or all of them for full attention) and the absolute position for RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionState:
    """Keys/values (batch, heads, cached, head_dim), already rotated, and the next position."""

    k: Tensor
    v: Tensor
    position: int

    def detach(self) -> "AttentionState":
        return AttentionState(self.k.detach(), self.v.detach(), self.position)


def rope_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape (time, head_dim/2) for absolute ``positions``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x (batch, heads, time, head_dim)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, window: int = 0, rope_base: float = 10000.0,
                 init_std: float = 0.02, out_scale: float = 1.0):
        super().__init__()
        assert dim % n_heads == 0 and (dim // n_heads) % 2 == 0
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.window = window
        self.rope_base = rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.qkv.weight, std=init_std)
        nn.init.normal_(self.proj.weight, std=init_std * out_scale)  # residual branch: scaled by depth

    def forward(self, x: Tensor, state: AttentionState | None = None, ttl: object = None) -> tuple[Tensor, AttentionState]:
        """x: (B, T, D) -> y: (B, T, D) and the KV state. ``ttl`` (the mixer protocol's test-time-learning
        control) has nothing to act on here."""
        B, T, D = x.shape
        start = 0 if state is None else state.position
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope_tables(torch.arange(start, start + T, device=x.device), self.head_dim, self.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None and state.k.shape[2] > 0:
            k_all, v_all = torch.cat((state.k, k), dim=2), torch.cat((state.v, v), dim=2)
        else:
            k_all, v_all = k, v
        past = k_all.shape[2] - T
        if past == 0 and (self.window == 0 or self.window >= T):
            y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
        elif self.window > 0 and T > 2 * self.window:
            y = self._banded(q, k_all, v_all, past)
        else:
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=self._mask(T, past, x.device))
        y = self.proj(y.transpose(1, 2).reshape(B, T, D))
        keep = k_all.shape[2] if self.window == 0 else min(self.window - 1, k_all.shape[2])
        new_state = AttentionState(k_all[:, :, k_all.shape[2] - keep:], v_all[:, :, v_all.shape[2] - keep:], start + T)
        return y, new_state

    def _banded(self, q: Tensor, k: Tensor, v: Tensor, past: int) -> Tensor:
        """Sliding-window attention in blocks of ``window`` queries, each against the ``2 * window``
        keys that can hold its window: O(T * window) work and memory instead of the dense mask's
        O(T^2), the same result. ``k``/``v`` hold ``past`` (< window) cached keys, then T new ones."""
        b, T = self.window, q.shape[2]
        blocks = -(-T // b)
        left, right = b - past, blocks * b - T            # pad keys so block n reads padded keys [n*b, n*b + 2b)
        q = F.pad(q, (0, 0, 0, right))
        k, v = (F.pad(t, (0, 0, left, right)).unfold(2, 2 * b, b).transpose(-1, -2) for t in (k, v))
        q = q.unflatten(2, (blocks, b))                   # (B, H, blocks, b, d)
        r = torch.arange(b, device=q.device)[:, None]     # query offset in its block
        c = torch.arange(2 * b, device=q.device)[None, :] # key offset in the block's keys
        n = torch.arange(blocks, device=q.device)[:, None, None]
        # key absolute index n*b + c - left must be >= 0 (not padding) and inside (query - window, query]
        mask = (c > r) & (c <= r + b) & (n * b + c >= left)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.flatten(2, 3)[:, :, :T]

    def _mask(self, T: int, past: int, device: torch.device) -> Tensor:
        """Boolean (T, past+T) mask: query i (absolute past+i) sees key j iff j <= past+i and within the window."""
        qpos = torch.arange(past, past + T, device=device)[:, None]
        kpos = torch.arange(past + T, device=device)[None, :]
        mask = kpos <= qpos
        if self.window > 0:
            mask &= kpos > qpos - self.window
        return mask
