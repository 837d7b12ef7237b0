"""The byte-level halves of the Byte Latent Transformer: pooling bytes into patches (encoder side)
and reading patches back into bytes (decoder side), both as small cross-attentions.

A patch offers ``queries`` vectors of the byte width: the pooler's queries start from the
max-pool of the patch's bytes (as BLT initialises them) and attend over those bytes only; their
outputs, concatenated, are projected to the global width. On the way back, each byte attends
over ``queries`` key/value vectors cut from the global model's output for the last patch it may
see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchPooler(nn.Module):
    """``z = pool(bytes, mask)``: bytes (N, L, d) of N patches (``mask`` (N, L) marks real bytes,
    at least one per patch) -> (N, out_dim) patch vectors."""

    def __init__(self, dim: int, out_dim: int, queries: int, heads: int, eps: float, init_std: float):
        super().__init__()
        assert dim % heads == 0
        self.queries, self.heads = queries, heads
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.query = nn.Linear(dim, queries * dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(queries * dim, out_dim, bias=False)
        for lin in (self.query, self.kv, self.out):
            nn.init.normal_(lin.weight, std=init_std)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        N, L, d = x.shape
        h, hd = self.heads, d // self.heads
        x = self.norm(x)
        pooled = x.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)            # (N, d)
        q = self.query(pooled).view(N, self.queries, d)
        k, v = self.kv(x).view(N, L, 2, h, hd).permute(2, 0, 3, 1, 4)                  # (N, h, L, hd)
        attn = F.scaled_dot_product_attention(q.view(N, self.queries, h, hd).transpose(1, 2), k, v,
                                              attn_mask=mask[:, None, None, :])
        q = q + attn.transpose(1, 2).reshape(N, self.queries, d)
        return self.out(q.reshape(N, self.queries * d))


class PatchReader(nn.Module):
    """``y = read(x, patch)``: each byte of x (B, T, d) attends over the ``queries`` key/value
    vectors of its patch vector (B, T, queries, d); returns the residual branch (B, T, d)."""

    def __init__(self, dim: int, heads: int, eps: float, init_std: float, out_scale: float):
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.q.weight, std=init_std)
        nn.init.normal_(self.kv.weight, std=init_std)
        nn.init.normal_(self.proj.weight, std=init_std * out_scale)

    def forward(self, x: Tensor, patch: Tensor) -> Tensor:
        B, T, d = x.shape
        h, hd = self.heads, d // self.heads
        q = self.q(self.norm(x)).view(B, T, h, hd)
        k, v = self.kv(patch).view(B, T, -1, 2, h, hd).unbind(3)                       # (B, T, k, h, hd)
        weights = torch.softmax(torch.einsum("bthd,btkhd->bthk", q, k) / hd ** 0.5, dim=-1)
        return self.proj(torch.einsum("bthk,btkhd->bthd", weights, v).reshape(B, T, d))
