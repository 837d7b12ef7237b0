"""Multi-query associative recall (MQAR), the standard probe of a sequence model's memory.

A sequence starts with ``pairs`` key-value pairs ``k1 v1 k2 v2 ...``; later, at random
positions, keys from those pairs appear again and the model must predict the value that
followed that key. Only those predictions are scored (targets elsewhere are
:data:`~neatlm.nn.loss.IGNORE_INDEX`); the query accuracy is :func:`neatlm.nn.loss.argmax_hits`.

Token layout with vocabulary ``V``: 0 is filler, keys come from ``[1, V/2)``, values from
``[V/2, V)``. Keys within a sequence are distinct, so every query has one right answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn.loss import IGNORE_INDEX
from .corpus import PositionedSampler


def mqar_batch(batch: int, seq_len: int, pairs: int, vocab: int = 256, queries: int | None = None,
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of shape (batch, seq_len); targets are IGNORE_INDEX except at query keys.

    ``queries`` defaults to ``pairs`` (every key is asked once). Needs
    ``2 * pairs + 2 * queries <= seq_len`` and ``pairs < vocab / 2``.
    """
    queries = pairs if queries is None else queries
    if pairs < 1 or queries < 1 or queries > pairs:
        raise ValueError(f"MQAR needs 1 <= queries <= pairs (got pairs={pairs}, queries={queries})")
    if 2 * pairs + 2 * queries > seq_len:
        raise ValueError(f"MQAR: 2*pairs + 2*queries = {2 * pairs + 2 * queries} exceeds seq_len = {seq_len}")
    half = vocab // 2
    if pairs > half - 1:
        raise ValueError(f"MQAR: pairs = {pairs} needs vocab >= {2 * pairs + 2} (got {vocab})")
    g = torch.Generator().manual_seed(seed)
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    context = 2 * pairs
    slots = (seq_len - context) // 2  # query slots of two tokens after the context
    for b in range(batch):
        keys = torch.randperm(half - 1, generator=g)[:pairs] + 1
        values = torch.randint(half, vocab, (pairs,), generator=g)
        inputs[b, 0:context:2], inputs[b, 1:context:2] = keys, values
        asked = torch.randperm(pairs, generator=g)[:queries]
        where = torch.randperm(slots, generator=g)[:queries].sort().values
        pos = context + 2 * where
        inputs[b, pos], inputs[b, pos + 1] = keys[asked], values[asked]
        targets[b, pos] = values[asked]  # at the query key, predict its value
    return inputs, targets


class MQARSampler(PositionedSampler):
    """Fresh MQAR batches; batch ``i`` is a function of ``(seed, i)`` like the text sampler."""

    def __init__(self, batch_size: int, seq_len: int, pairs: int, vocab: int, queries: int | None, seed: int,
                 position: int = 0):
        self.batch_size, self.seq_len, self.pairs, self.vocab = batch_size, seq_len, pairs, vocab
        self.queries, self.seed, self.position = queries, seed, position
        mqar_batch(1, seq_len, pairs, vocab, queries, seed=0)  # fail now on impossible settings

    def next(self) -> tuple[Tensor, Tensor]:
        batch = mqar_batch(self.batch_size, self.seq_len, self.pairs, self.vocab, self.queries,
                           seed=self.seed * 1_000_003 + self.position)
        self.position += 1
        return batch
