"""Hash n-gram embeddings of the BLT local encoder (Byte Latent Transformer, sec. 3.2.1).

Each byte is embedded together with the n-grams that end at it (n = ``min_n`` .. ``max_n``): every
n-gram is hashed into one of ``buckets`` rows of that n's embedding table. The hash is a fixed
polynomial over the byte values in int64 arithmetic (not Python's ``hash``, which is salted per
process), so a byte sequence gets the same rows in every process and on every machine.

Before the first byte of a stream the n-grams see a pad value (256) that no byte has.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PAD = 256
_BASE = 1_000_003                 # odd multiplier of the polynomial rolling hash
_MOD = (1 << 31) - 1              # keeps every product inside int64


def ngram_hashes(history: Tensor, n: int, buckets: int) -> Tensor:
    """Bucket of the n-gram ending at each byte. ``history``: (B, n - 1 + T) long, the ``n - 1``
    bytes before the call (or PAD) then the call's T bytes; returns (B, T)."""
    T = history.shape[1] - (n - 1)
    h = torch.zeros(history.shape[0], T, dtype=torch.long, device=history.device)
    for j in range(n):                             # h = sum_j (byte_j + 1) * BASE^(n-1-j) mod MOD
        h = (h * _BASE + history[:, j:j + T] + 1) % _MOD
    return h % buckets


class HashNgramEmbedding(nn.Module):
    """``e = embed(x) + sum_n table_n[hash_n(x)]``, with the last ``max_n - 1`` bytes carried."""

    def __init__(self, dim: int, buckets: int, min_n: int, max_n: int, init_std: float = 0.02):
        super().__init__()
        self.byte = nn.Embedding(256, dim)
        self.sizes = list(range(min_n, max_n + 1))
        self.buckets = buckets
        self.tables = nn.ModuleList(nn.Embedding(buckets, dim) for _ in self.sizes)
        for table in [self.byte, *self.tables]:
            nn.init.normal_(table.weight, std=init_std)

    @property
    def context(self) -> int:
        """Bytes before the call that the n-grams read."""
        return max(self.sizes, default=1) - 1

    def forward(self, idx: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
        """idx (B, T) bytes, ``tail`` (B, context) the bytes before them (None: stream start).
        Returns (embeddings (B, T, dim), the new tail)."""
        B = idx.shape[0]
        if tail is None:
            tail = torch.full((B, self.context), PAD, dtype=torch.long, device=idx.device)
        history = torch.cat((tail, idx), dim=1)
        x = self.byte(idx)
        for n, table in zip(self.sizes, self.tables):
            x = x + table(ngram_hashes(history[:, history.shape[1] - idx.shape[1] - (n - 1):], n, self.buckets))
        return x, history[:, history.shape[1] - self.context:]
