"""Validation: loss, bits per byte and (for MQAR) query accuracy over fixed batches.

Each validation window starts from a fresh state and runs as the same consecutive segments as
training, carrying state between them, so memory is measured the way it is used.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Iterable

import torch

from ..nn.loss import argmax_hits, lm_loss
from ..nn.model import NeatLM
from .metrics import bits_per_byte
from .state_io import detach_state


@torch.no_grad()
def evaluate(model: NeatLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], segments: int,
             device: torch.device, autocast: ContextManager | None = None, accuracy: bool = False) -> dict[str, float]:
    """{"val_loss": nats per scored token, "val_bpb": bits per byte[, "val_acc": arg-max accuracy]}.

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
