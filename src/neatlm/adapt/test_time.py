"""Coordinated test-time learning: the memories and the SVF vectors learn from one document as it
is read, at the same time.

The document is read in chunks of ``adapt.ttl_chunk`` bytes with the model state carried. Each
chunk is first scored (those losses are what is reported), then the z vectors take one Adam step
on that chunk's loss: the bytes just read. The memories learn inside the same forward pass, as
they always do. So the prediction of a byte uses adaptation from earlier chunks only (earlier
bytes of its own chunk reach it through attention and the memory, never through a step), and the
whole procedure stays causal: changing a byte never changes a prediction before it.

The steps go through the :class:`~neatlm.grad.coordinator.GradientCoordinator` with two
components, ``svf`` (the z vectors) and ``base`` (every other weight), inside
``coord.only("svf")``: the base weights receive no gradient and never move, the z vectors get
the coordinator's clipping and divergence guard, and a fresh optimizer per document.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor

from ..config import AdaptConfig
from ..grad.components import ComponentSpec
from ..grad.coordinator import GradientCoordinator
from ..nn.loss import lm_loss
from ..train.stream import read_in_calls
from .base import AdaptedModel
from .svf import Z_PATTERN


@dataclass
class TestTimeResult:
    nats: Tensor                 # (len(doc) - 1,) the loss of predicting byte i + 1, as it was scored
    z: dict[str, Tensor]         # the z vectors after the document


def learn_document(adapted: AdaptedModel, doc: bytes, z0: dict[str, Tensor], settings: AdaptConfig) -> TestTimeResult:
    """Read ``doc`` from ``z0`` with the memories and the z vectors learning; the per-byte losses."""
    model = adapted.model
    device = next(model.parameters()).device
    adapted.use(z0)
    frozen = [p for name, p in model.named_parameters() if not fnmatchcase(name, Z_PATTERN)]
    for p in frozen:      # the base is a component of its own here, held still by only("svf")
        p.requires_grad_(True)
    try:
        chunks = max(1, -(-(len(doc) - 1) // settings.ttl_chunk))
        specs = [ComponentSpec(name="svf", patterns=(Z_PATTERN,), lr=settings.ttl_lr, schedule="constant", clip=1.0),
                 ComponentSpec(name="base", patterns=("*",), exclude=(Z_PATTERN,))]
        coord = GradientCoordinator(model, specs, total_steps=chunks, guard=adapted.cfg.guard)
        was_training = model.training
        model.eval()
        ids = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long().to(device)
        losses = []
        with coord.only("svf"):
            for _, out, y in read_in_calls(model, ids, settings.ttl_chunk):
                nats = lm_loss(out.logits, y, reduction="none")   # scored first, then learned from
                losses.append(nats.detach().flatten())
                coord.backward(nats.mean())
                coord.step()
                coord.zero_grad()
        model.train(was_training)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    z = adapted.current_z()
    return TestTimeResult(torch.cat(losses).cpu() if losses else torch.zeros(0), z)
