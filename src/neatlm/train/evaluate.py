"""Validation: loss, bits per byte and (for MQAR) query accuracy over fixed batches.

Each validation window starts from a fresh state and runs as the same consecutive segments as
training, carrying state between them, so memory is measured the way it is used.
:func:`mqar_accuracy` scores MQAR at lengths and pair counts other than the training ones.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch

from ..data.synthetic import check_mqar, mqar_batch
from ..nn.loss import argmax_hits, lm_loss
from ..nn.model import NeatLM
from .metrics import bits_per_byte
from .state_io import detach_state


@torch.no_grad()
def evaluate(model: NeatLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], segments: int,
             device: torch.device, autocast: ContextManager | None = None, accuracy: bool = False,
             mask: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """{"val_loss": nats per scored token, "val_bpb": bits per byte[, "val_acc": arg-max accuracy]}.

    ``mask(logits, inputs)``: what the task does to the logits before they are scored (MVoT: the
    modality mask); None scores them as they are.

    Test-time learning still runs here (no_grad only skips the graph).
    """
    was_training = model.training
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        state = None
        for xs, ys in zip(x.chunk(segments, dim=1), y.chunk(segments, dim=1)):
            with autocast or nullcontext():
                logits, state, _, _ = model(xs, state)
            if mask is not None:
                logits = mask(logits, xs)
            state = detach_state(state)
            hits, scored = argmax_hits(logits, ys)
            if scored:
                loss_sum += lm_loss(logits, ys, reduction="sum").item()
            correct += hits
            count += scored
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    result = {"val_loss": loss, "val_bpb": bits_per_byte(loss)}
    if accuracy:
        result["val_acc"] = correct / max(count, 1)
    return result


@torch.no_grad()
def mqar_accuracy(model: NeatLM, seq_len: int, pairs: int, batches: int = 4, batch_size: int = 32,
                  vocab: int | None = None, gaps: str = "uniform", power_a: float = 0.01, call_len: int = 0,
                  device: torch.device | str = "cpu", seed: int = 0, queries: int | None = None) -> float:
    """Query accuracy on fresh MQAR sequences of a (length, pairs) other than the training one.

    Recall that only works at the training shape is not recall; this measures whether it holds
    with more pairs, further back. A model with a sliding window (``model.window > 0``) reads
    each sequence ``call_len`` tokens at a time (0 = its ``train.seq_len``), state carried and
    detached between calls, memory learning as it reads, so its state stays bounded at any length.
    A full-attention model reads a sequence in one call and only up to ``model.context`` (its
    positions beyond were never trained and its cache would grow with the sequence): beyond it
    the result is NaN. ``vocab`` defaults to the model's; ``seed`` picks the sequences.
    """
    m = model.cfg.model
    vocab = m.vocab_size if vocab is None else vocab
    if vocab > m.vocab_size:
        raise ValueError(f"MQAR vocab = {vocab} exceeds the model's vocab_size = {m.vocab_size}")
    if batches < 1 or batch_size < 1 or call_len < 0:
        raise ValueError(f"batches = {batches}, batch_size = {batch_size}: must be >= 1; call_len = {call_len}: "
                         "must be >= 0")
    check_mqar(seq_len, pairs, vocab, queries, gaps, power_a)
    if m.window == 0 and seq_len > m.context:
        return math.nan
    call_len = (call_len or model.cfg.train.seq_len) if m.window > 0 else seq_len
    was_training = model.training
    model.eval()
    correct = count = 0
    for i in range(batches):
        x, y = mqar_batch(batch_size, seq_len, pairs, vocab, queries, seed=seed * 1_000_003 + i, gaps=gaps,
                          power_a=power_a)
        x, y = x.to(device), y.to(device)
        state = None
        for start in range(0, seq_len, call_len):
            out = model(x[:, start:start + call_len], state)
            state = detach_state(out.state)
            hits, scored = argmax_hits(out.logits, y[:, start:start + call_len])
            correct, count = correct + hits, count + scored
    model.train(was_training)
    return correct / count
