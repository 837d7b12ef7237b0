"""Validation: mean next-byte loss and bits per byte over fixed, evenly spaced windows."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import numpy as np
import torch

from ..data.corpus import validation_batches
from ..nn.model import NeatLM, lm_loss
from .metrics import bits_per_byte


@torch.no_grad()
def evaluate_bpb(model: NeatLM, val: np.ndarray, batch_size: int, seq_len: int, n_batches: int,
                 device: torch.device, autocast: ContextManager | None = None) -> dict[str, float]:
    """{"val_loss": nats per byte, "val_bpb": bits per byte}. Each window starts a fresh sequence."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in validation_batches(val, batch_size, seq_len, n_batches):
        with autocast or nullcontext():
            logits, _ = model(x.to(device))
        total += lm_loss(logits, y.to(device)).item()
    model.train(was_training)
    loss = total / n_batches
    return {"val_loss": loss, "val_bpb": bits_per_byte(loss)}
