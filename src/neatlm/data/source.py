"""What the trainer trains on: a sampler of (inputs, targets) batches and fixed validation batches.

Three tasks share this interface: ``text`` (next byte of a corpus), ``mqar`` (associative recall,
scored only at query positions) and ``passkey`` (a five-digit key hidden at a random depth of
corpus text, asked at the end; only the answer digits are scored). Every sampler is a pure
function of ``(seed, position)``. Passkey training examples hide the needle in the corpus's
training bytes and validation examples in its held-out bytes, both as long as a training window
(``train.seq_len * train.segments``), so validation measures recall at the trained distance.

A text corpus with ``data.val_fraction = 0`` has no validation data: the trainer then skips
evaluation. A positive fraction that leaves too little for one validation window is refused when
the data is loaded, not at the first evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..config import Config, DataConfig
from ..errors import DataError
from ..nn.loss import lm_loss
from ..nn.mvot import MVoTLoss
from .corpus import BatchSampler, Corpus, DocumentSampler, StreamSampler, load_corpus, validation_batches
from .mvot import MVoTSampler, MVoTTask, load_task
from .passkey import PasskeySampler, passkey_batch
from .synthetic import MQARSampler, mqar_batch

Batch = tuple[torch.Tensor, torch.Tensor]

VALIDATION_SEED = 987_654_321  # MQAR and passkey validation sequences never coincide with training ones
ACCURACY_TASKS = ("mqar", "passkey", "mvot")  # tasks whose validation also reports val_acc (arg-max accuracy)
# a task's training loss: (logits, targets, inputs) aligned -> summed over the scored targets
TaskLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The loss of every task but MVoT: summed cross-entropy of the scored targets."""
    return lm_loss(logits, targets, reduction="sum")


@dataclass
class DataSource:
    task: str
    sampler: BatchSampler | StreamSampler | DocumentSampler | MQARSampler | PasskeySampler  # PositionedSamplers
    corpus: Corpus | None
    cfg: Config
    # chosen once from the config: the training loss, and what validation does to the logits
    # before scoring them (MVoT: the modality mask; None: nothing)
    loss: TaskLoss = next_token_loss
    mask: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    mvot: MVoTTask | None = None

    def describe(self) -> str:
        if self.corpus is not None:
            c = self.corpus
            text = f"{c.source} ({c.train.size:,} train / {c.val.size:,} validation bytes)"
            if self.task == "passkey":
                return f"passkey retrieval, {self.window}-byte examples hidden in {text}"
            return text
        if self.mvot is not None:
            mv = self.mvot.settings
            kind = (f"visual thoughts of {self.mvot.layout.codebook} codes" if self.mvot.layout
                    else "text only, no images")
            return (f"MVoT grid worlds ({mv.min_size}x{mv.min_size} to {mv.max_size}x{mv.max_size}, "
                    f"{mv.min_moves}-{mv.max_moves} moves, {kind}, {self.mvot.length}-token windows)")
        d = self.cfg.data
        return (f"MQAR ({d.mqar_pairs} pairs, {d.mqar_queries or d.mqar_pairs} queries, seq_len "
                f"{self.cfg.train.seq_len}, {_gaps_text(d)} gaps, vocab {self.cfg.model.vocab_size})")

    @property
    def window(self) -> int:
        """Bytes of one sampled window: ``train.segments`` consecutive ``train.seq_len`` segments."""
        return self.cfg.train.seq_len * self.cfg.train.segments

    @property
    def scores_accuracy(self) -> bool:
        """Whether validation reports ``val_acc``: the fraction of scored positions predicted right
        (MQAR: queries; passkey: answer digits, chance 0.1)."""
        return self.task in ACCURACY_TASKS

    @property
    def has_validation(self) -> bool:
        return self.corpus is None or self.corpus.val.size > 0

    def validation(self, n_batches: int) -> Iterator[Batch]:
        t = self.cfg.train
        if not self.has_validation:
            raise DataError(f"{self.corpus.source}: no validation data (data.val_fraction = "
                            f"{self.cfg.data.val_fraction}); set data.val_fraction > 0 to hold some out")
        if self.task == "passkey":
            for i in range(n_batches):  # fixed examples: the same for every evaluation
                yield passkey_batch(self.corpus.val, t.batch_size, self.window, seed=VALIDATION_SEED + i,
                                    depth=self.cfg.data.passkey_depth, questions=self.cfg.data.passkey_questions)
            return
        if self.mvot is not None:
            for i in range(n_batches):  # the first validation examples: the same for every evaluation
                yield self.mvot.batch("validation", list(range(i * t.batch_size, (i + 1) * t.batch_size)))
            return
        if self.corpus is not None:
            yield from validation_batches(self.corpus.val, t.batch_size, self.window, n_batches)
            return
        d = self.cfg.data
        for i in range(n_batches):
            yield mqar_batch(t.batch_size, self.window, d.mqar_pairs, self.cfg.model.vocab_size,
                             d.mqar_queries or None, seed=VALIDATION_SEED + i, gaps=d.mqar_gaps,
                             power_a=d.mqar_power_a)


def _gaps_text(d: DataConfig) -> str:
    return f"power-law (a = {d.mqar_power_a:g})" if d.mqar_gaps == "power" else "uniform"


def build_data(cfg: Config) -> DataSource:
    t, d = cfg.train, cfg.data
    window = t.seq_len * t.segments  # consecutive segments of one sampled window
    if d.task == "mqar":
        sampler = MQARSampler(t.batch_size, window, d.mqar_pairs, cfg.model.vocab_size, d.mqar_queries or None,
                              d.seed, gaps=d.mqar_gaps, power_a=d.mqar_power_a)
        return DataSource("mqar", sampler, None, cfg)
    if d.task == "mvot":
        task = load_task(cfg.mvot, cfg.vq, window)
        loss = MVoTLoss(task.layout, task.vq.distances() if task.vq is not None else None,
                        cfg.mvot.discrepancy_weight)
        return DataSource("mvot", MVoTSampler(task, t.batch_size, d.seed), None, cfg, loss=loss,
                          mask=loss.mask if task.layout is not None else None, mvot=task)
    if d.task == "mvot-vq":
        raise DataError("data.task = 'mvot-vq' trains the visual codebook, not a language model: run it with "
                        "`neat train --preset mvot-vq`")
    corpus = load_corpus(d)
    if d.task == "passkey":
        return _passkey_data(corpus, cfg)
    if corpus.val.size and corpus.val.size < window + 1:  # validation windows are as long as training ones
        raise DataError(f"data.val_fraction = {d.val_fraction} holds out {corpus.val.size} bytes of {corpus.source}, "
                        f"fewer than one validation window (train.seq_len * train.segments + 1 = {window + 1}); "
                        "raise it, or set it to 0 to train without validation")
    if d.sampling == "documents":
        assert corpus.train_starts is not None
        sampler = DocumentSampler(corpus.train, corpus.train_starts, t.batch_size, window, d.episode_windows, d.seed,
                                  source=corpus.source)
    else:
        sampler_class = StreamSampler if d.sampling == "stream" else BatchSampler
        sampler = sampler_class(corpus.train, t.batch_size, window, d.seed)
    return DataSource("text", sampler, corpus, cfg)


def _passkey_data(corpus: Corpus, cfg: Config) -> DataSource:
    """Passkey examples of one training window each: needles in training text to learn from,
    needles in held-out text to validate on."""
    t, d = cfg.train, cfg.data
    window = t.seq_len * t.segments
    if corpus.val.size and corpus.val.size < window:
        raise DataError(f"data.val_fraction = {d.val_fraction} holds out {corpus.val.size} bytes of {corpus.source}, "
                        f"fewer than one passkey example (train.seq_len * train.segments = {window}); raise it, or "
                        "set it to 0 to train without validation")
    return DataSource("passkey", PasskeySampler(corpus.train, t.batch_size, window, d.seed,
                                                  depth=d.passkey_depth, questions=d.passkey_questions),
                      corpus, cfg)
