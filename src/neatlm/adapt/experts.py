"""Training an SVF expert on a domain, and scoring documents with given z vectors.

An expert is trained with the next-byte loss on random windows of the domain's training files,
through the :class:`~neatlm.grad.coordinator.GradientCoordinator` with one component, ``svf``,
that claims the z vectors (everything else is frozen), so it gets the coordinator's clipping,
schedule and divergence guard like any other component. The memory layers keep learning at test
time inside each window, as they do for the base model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..config import AdaptConfig
from ..data.corpus import BatchSampler, Corpus, validation_batches
from ..grad.components import ComponentSpec
from ..grad.coordinator import GradientCoordinator
from ..nn.loss import lm_loss
from ..train.evaluate import evaluate
from ..train.stream import read_in_calls
from .base import AdaptedModel
from .svf import Z_PATTERN


@dataclass
class ExpertResult:
    z: dict[str, Tensor]
    val_bpb_before: float        # the base model (z = 1) on the domain's held-out windows
    val_bpb_after: float
    seconds: float
    steps: int


def svf_coordinator(adapted: AdaptedModel, lr: float, steps: int, warmup: int) -> GradientCoordinator:
    """A coordinator whose one component, ``svf``, owns the z vectors (the base is frozen)."""
    spec = ComponentSpec(name="svf", patterns=(Z_PATTERN,), lr=lr, warmup_steps=min(warmup, steps - 1),
                         clip=1.0, weight_decay=0.0)
    return GradientCoordinator(adapted.model, [spec], total_steps=steps, guard=adapted.cfg.guard)


def train_expert(adapted: AdaptedModel, corpus: Corpus, settings: AdaptConfig, seed: int = 0,
                 val_batches: int = 8, log: Callable[[str], None] | None = None) -> ExpertResult:
    """Train z vectors (from 1) on ``corpus.train``; held-out bits per byte before and after."""
    model, device = adapted.model, next(adapted.model.parameters()).device
    adapted.use(adapted.ones())

    def validate() -> float:
        if corpus.val.size < settings.seq_len + 1:
            return math.nan
        batches = validation_batches(corpus.val, settings.batch_size, settings.seq_len, val_batches)
        return evaluate(model, batches, 1, device)["val_bpb"]

    before = validate()
    coord = svf_coordinator(adapted, settings.lr, settings.steps, settings.warmup_steps)
    sampler = BatchSampler(corpus.train, settings.batch_size, settings.seq_len, seed)
    model.train()
    start = time.perf_counter()
    for step in range(settings.steps):
        x, y = (t.to(device) for t in sampler.next())
        loss = lm_loss(model(x).logits, y)
        coord.backward(loss)
        coord.step()
        coord.zero_grad()
        if log and (step + 1) % max(1, settings.steps // 10) == 0:
            log(f"step {step + 1}: loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    z = adapted.current_z()
    return ExpertResult(z, before, validate(), seconds, settings.steps)


@torch.no_grad()
def document_nats(adapted: AdaptedModel, doc: bytes, z: dict[str, Tensor], start: int,
                  call_len: int = 256) -> tuple[float, int]:
    """(summed nats, bytes scored) of ``doc`` read whole with z vectors ``z``, state carried from
    call to call (memories learning as they read); bytes before position ``start`` are read as
    context but not scored."""
    model, device = adapted.model, next(adapted.model.parameters()).device
    adapted.use(z)
    was_training = model.training
    model.eval()
    ids = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long().to(device)
    nats, count = 0.0, 0
    for at, out, y in read_in_calls(model, ids, call_len):
        first = max(start - (at + 1), 0)          # target j predicts byte at + 1 + j
        if first < y.shape[1]:
            nats += float(lm_loss(out.logits[:, first:], y[:, first:], reduction="sum"))
            count += y.shape[1] - first
    model.train(was_training)
    return nats, count


def documents_bits_per_byte(adapted: AdaptedModel, docs: Sequence[bytes], choose_z: Callable[[bytes], dict[str, Tensor]],
                  prefix: int) -> float:
    """Bits per byte over ``docs`` past their first ``prefix`` bytes, each document read with the
    z vectors ``choose_z`` picks from its prefix (the two passes of Transformer²)."""
    nats, count = 0.0, 0
    for doc in docs:
        z = choose_z(doc[:prefix])
        n, c = document_nats(adapted, doc, z, prefix)
        nats, count = nats + n, count + c
    return nats / max(count, 1) / math.log(2)
