"""What the trainer trains on: a sampler of (inputs, targets) batches and fixed validation batches.

Two tasks share this interface: ``text`` (next byte of a corpus) and ``mqar`` (associative recall,
scored only at query positions). Both samplers are pure functions of ``(seed, position)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import Config
from .corpus import BatchSampler, Corpus, load_corpus, validation_batches
from .synthetic import MQARSampler, mqar_batch

Batch = tuple[torch.Tensor, torch.Tensor]

VALIDATION_SEED = 987_654_321  # MQAR validation sequences never coincide with training ones


@dataclass
class DataSource:
    task: str
    sampler: BatchSampler | MQARSampler
    corpus: Corpus | None
    cfg: Config

    def describe(self) -> str:
        if self.corpus is not None:
            c = self.corpus
            return f"{c.source} ({c.train.size:,} train / {c.val.size:,} validation bytes)"
        d = self.cfg.data
        return f"MQAR ({d.mqar_pairs} pairs, {d.mqar_queries or d.mqar_pairs} queries, seq_len {self.cfg.train.seq_len})"

    def validation(self, n_batches: int) -> Iterator[Batch]:
        t = self.cfg.train
        if self.corpus is not None:
            yield from validation_batches(self.corpus.val, t.batch_size, t.seq_len, n_batches)
            return
        d = self.cfg.data
        for i in range(n_batches):
            yield mqar_batch(t.batch_size, t.seq_len, d.mqar_pairs, self.cfg.model.vocab_size,
                             d.mqar_queries or None, seed=VALIDATION_SEED + i)


def build_data(cfg: Config) -> DataSource:
    t, d = cfg.train, cfg.data
    window = t.seq_len * t.segments  # consecutive segments of one sampled window
    if d.task == "mqar":
        sampler = MQARSampler(t.batch_size, window, d.mqar_pairs, cfg.model.vocab_size, d.mqar_queries or None,
                              d.seed)
        return DataSource("mqar", sampler, None, cfg)
    corpus = load_corpus(d)
    return DataSource("text", BatchSampler(corpus.train, t.batch_size, window, d.seed), corpus, cfg)
