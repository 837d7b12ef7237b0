"""Multi-query associative recall (MQAR), the standard probe of a sequence model's memory.

A sequence starts with ``pairs`` key-value pairs ``k1 v1 k2 v2 ...``; later, in two-token query
slots, keys from those pairs appear again and the model must predict the value that followed that
key. Only those predictions are scored (targets elsewhere are
:data:`~neatlm.nn.loss.IGNORE_INDEX`); the query accuracy is :func:`neatlm.nn.loss.argmax_hits`.

Token layout with vocabulary ``V``: 0 is filler, keys come from ``[1, V/2)``, values from
``[V/2, V)``. Keys within a sequence are distinct, so every query has one right answer.

Where the queries sit (``gaps``):

* ``"uniform"``: every query slot after the context is equally likely.
* ``"power"``: the setting of Zoology/Based (Arora et al.): slot ``x`` (1 = right after the
  context) is drawn with probability proportional to ``power_a * x ** (power_a - 1)``, without
  replacement. In text, the gap between a bigram and its repeat follows a power law, so most
  queries come soon after the context and a few come far from it. ``power_a = 1`` is uniform;
  the smaller it is, the more the queries cluster near the context (Zoology uses 0.01). When
  the queries fill every slot (``2 * pairs + 2 * queries = seq_len``) the two are the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn.loss import IGNORE_INDEX
from .corpus import PositionedSampler

GAPS = ("uniform", "power")


def check_mqar(seq_len: int, pairs: int, vocab: int, queries: int | None = None, gaps: str = "uniform",
               power_a: float = 0.01) -> int:
    """The number of queries, or ValueError naming what makes the setting impossible.

    Shared by the generator and by anything that builds MQAR sequences of another shape (the
    evaluation at other lengths), so that an impossible setting fails before any work.
    """
    queries = pairs if queries is None else queries
    if pairs < 1 or queries < 1 or queries > pairs:
        raise ValueError(f"MQAR needs 1 <= queries <= pairs (got pairs={pairs}, queries={queries})")
    if 2 * pairs + 2 * queries > seq_len:
        raise ValueError(f"MQAR: 2*pairs + 2*queries = {2 * pairs + 2 * queries} exceeds seq_len = {seq_len}")
    if pairs > vocab // 2 - 1:
        raise ValueError(f"MQAR: pairs = {pairs} needs vocab >= {2 * pairs + 2} (got {vocab})")
    if gaps not in GAPS:
        raise ValueError(f"MQAR: gaps = {gaps!r} (allowed: {', '.join(map(repr, GAPS))})")
    if not power_a > 0:
        raise ValueError(f"MQAR: power_a = {power_a!r} must be > 0")
    return queries


def power_law_weights(slots: int, power_a: float) -> Tensor:
    """Unnormalised probability of each query slot ``x = 1..slots``: ``power_a * x ** (power_a - 1)``.

    float64 so that small ``power_a`` over thousands of slots keeps every slot drawable.
    """
    x = torch.arange(1, slots + 1, dtype=torch.float64)
    return power_a * x ** (power_a - 1)


def query_slots(slots: int, queries: int, gaps: str, power_a: float, g: torch.Generator) -> Tensor:
    """Sorted indices of the ``queries`` distinct slots (0 = right after the context) that hold a query."""
    if gaps == "uniform":
        where = torch.randperm(slots, generator=g)[:queries]
    else:
        where = torch.multinomial(power_law_weights(slots, power_a), queries, replacement=False, generator=g)
    return where.sort().values


def mqar_batch(batch: int, seq_len: int, pairs: int, vocab: int = 256, queries: int | None = None,
               seed: int = 0, gaps: str = "uniform", power_a: float = 0.01) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of shape (batch, seq_len); targets are IGNORE_INDEX except at query keys.

    ``queries`` defaults to ``pairs`` (every key is asked once). Needs
    ``2 * pairs + 2 * queries <= seq_len`` and ``pairs <= vocab / 2 - 1``. Each sequence is a
    function of ``seed`` alone; ``gaps="uniform"`` draws exactly what it did before ``gaps`` existed.
    """
    queries = check_mqar(seq_len, pairs, vocab, queries, gaps, power_a)
    half = vocab // 2
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
        pos = context + 2 * query_slots(slots, queries, gaps, power_a, g)
        inputs[b, pos], inputs[b, pos + 1] = keys[asked], values[asked]
        targets[b, pos] = values[asked]  # at the query key, predict its value
    return inputs, targets


class MQARSampler(PositionedSampler):
    """Fresh MQAR batches; batch ``i`` is a function of ``(seed, i)`` like the text sampler."""

    def __init__(self, batch_size: int, seq_len: int, pairs: int, vocab: int, queries: int | None, seed: int,
                 position: int = 0, gaps: str = "uniform", power_a: float = 0.01):
        self.batch_size, self.seq_len, self.pairs, self.vocab = batch_size, seq_len, pairs, vocab
        self.queries, self.seed, self.position = queries, seed, position
        self.gaps, self.power_a = gaps, power_a
        check_mqar(seq_len, pairs, vocab, queries, gaps, power_a)  # fail now on impossible settings

    def next(self) -> tuple[Tensor, Tensor]:
        batch = mqar_batch(self.batch_size, self.seq_len, self.pairs, self.vocab, self.queries,
                           seed=self.seed * 1_000_003 + self.position, gaps=self.gaps, power_a=self.power_a)
        self.position += 1
        return batch
