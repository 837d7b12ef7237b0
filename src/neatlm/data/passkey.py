"""Passkey retrieval (single needle in a haystack, as RULER's S-NIAH passkey task).

A sequence is held-out text with one sentence hidden at a random depth, then a question::

    ...haystack... The pass key is 73914. Remember it. ...haystack... What is the pass key? The pass key is 73914

Only the answer digits are scored (the targets elsewhere are ``IGNORE_INDEX``): the model must carry
five digits from wherever the needle was to the end of the sequence. With a sliding attention
window shorter than the distance, only a memory that learned at test time can answer; chance is
10% per digit.

Every example is a function of ``(seed, index)``, so evaluation sets are reproducible.

As a training task (``data.task = "passkey"``), :class:`PasskeySampler` hides the needles in the
corpus's training bytes; validation hides them in its held-out bytes (``neatlm.data.source``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..nn.loss import IGNORE_INDEX, argmax_correct
from .corpus import PositionedSampler

QUESTION = b"What is the pass key? The pass key is "


def needle(key: str) -> bytes:
    return f" The pass key is {key}. Remember it. ".encode()


def min_length(digits: int = 5, questions: int = 1) -> int:
    """The shortest sequence that holds the needle, the questions and their answers."""
    return len(needle("0" * digits)) + questions * (len(QUESTION) + digits) - 1


DEPTHS = ("uniform", "log")


def _needle_depth(rng: np.random.Generator, filler: int, depth: str) -> int:
    """Where the needle starts in ``filler`` haystack bytes.

    uniform: any depth alike (RULER). log: the distance from the needle to the question is
    log-uniform in [0, filler], so about ln(w) / ln(filler) of the examples have the key within the
    last w bytes: a short attention window can copy those, which gives the model a retrieval
    circuit to start from before it must carry the key in its memory over the far ones.
    """
    if depth == "uniform":
        return int(rng.integers(0, filler + 1))
    distance = int(np.exp(rng.uniform(0.0, np.log(filler + 1)))) - 1
    return filler - min(max(distance, 0), filler)


def passkey_example(haystack: np.ndarray, length: int, seed: int, digits: int = 5,
                    depth: str = "uniform", questions: int = 1) -> tuple[Tensor, Tensor, int]:
    """(inputs, targets, needle_start) for one sequence of ``length`` input bytes.

    ``haystack``: uint8 text to hide the needle in (a random slice of it is used); ``depth``: how
    the needle's depth is drawn (one of :data:`DEPTHS`, see :func:`_needle_depth`). With
    ``questions`` > 1 (training only), the question and its answer also come at random points
    between the needle and the end, each answer scored: more answers per example to learn from,
    the last one still as far from the needle as ``depth`` drew it.
    """
    if depth not in DEPTHS:
        raise DataError(f"passkey depth {depth!r}: must be one of {', '.join(DEPTHS)}")
    key_rng = np.random.default_rng([seed, 0])
    key = "".join(str(d) for d in key_rng.integers(0, 10, digits))
    hidden = needle(key)
    tail = QUESTION + key.encode()
    filler = length + 1 - len(hidden) - questions * len(tail)
    if filler < 0:
        raise DataError(f"passkey length {length}: must be at least {min_length(digits, questions)} bytes "
                        f"(the needle and {questions} question{'s' * (questions > 1)})")
    if haystack.size < filler:
        raise DataError(f"passkey length {length}: the haystack has only {haystack.size} bytes")
    rng = np.random.default_rng([seed, 1])
    start = int(rng.integers(0, haystack.size - filler + 1))
    hay = haystack[start:start + filler].tobytes()
    at = _needle_depth(rng, filler, depth)
    cuts = sorted(int(c) for c in rng.integers(at, filler + 1, size=questions - 1)) + [filler]
    seq, answers, prev = hay[:at] + hidden, [], at
    for cut in cuts:
        seq += hay[prev:cut] + QUESTION
        answers.append(len(seq))                                        # where this answer's digits start
        seq += key.encode()
        prev = cut
    ids = torch.tensor(list(seq), dtype=torch.long)                     # length + 1 bytes
    inputs, targets = ids[:-1], torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    for a in answers:                                                   # target j is byte j + 1
        targets[a - 1:a - 1 + digits] = ids[a:a + digits]
    return inputs, targets, at


def passkey_batch(haystack: np.ndarray, batch: int, length: int, seed: int, digits: int = 5,
                  depth: str = "uniform", questions: int = 1) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of shape (batch, length); example i is ``passkey_example(seed * 1_000_003 + i)``."""
    pairs = [passkey_example(haystack, length, seed * 1_000_003 + i, digits, depth, questions)[:2]
             for i in range(batch)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def passkey_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of sequences whose every answer digit is the arg-max prediction (RULER's score)."""
    right, scored = argmax_correct(logits, targets)
    return (right | ~scored).all(dim=-1).float().mean().item()


def passkey_digit_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of answer digits that are the arg-max prediction (chance 0.1): a finer signal than
    :func:`passkey_accuracy` while a model learns, and what ``val_acc`` reports for this task."""
    right, scored = argmax_correct(logits, targets)
    return right.sum().item() / max(int(scored.sum()), 1)


class PasskeySampler(PositionedSampler):
    """Training batches of passkey examples hidden in ``haystack`` (the corpus's training bytes).

    Batch ``i`` is ``passkey_batch(seed * 1_000_003 + i)``, a function of ``(seed, i)`` like the
    other samplers, so the position alone resumes it exactly.
    """

    def __init__(self, haystack: np.ndarray, batch_size: int, length: int, seed: int, digits: int = 5,
                 position: int = 0, depth: str = "uniform", questions: int = 1):
        if length < min_length(digits, questions):
            raise DataError(f"passkey examples of {length} bytes (train.seq_len * train.segments): must be at "
                            f"least {min_length(digits, questions)} bytes (the needle and the questions)")
        if haystack.size < length:
            raise DataError(f"the training data has {haystack.size} bytes, fewer than one passkey example "
                            f"(train.seq_len * train.segments = {length})")
        self.haystack, self.batch_size, self.length, self.digits = haystack, batch_size, length, digits
        self.seed, self.position, self.depth, self.questions = seed, position, depth, questions

    def next(self) -> tuple[Tensor, Tensor]:
        """(inputs, targets) of shape (batch, length); targets are IGNORE_INDEX except the answer digits."""
        batch = passkey_batch(self.haystack, self.batch_size, self.length, self.seed * 1_000_003 + self.position,
                              self.digits, self.depth, self.questions)
        self.position += 1
        return batch
