"""Multimodal Visualization-of-Thought (Li et al. 2025) on a byte-level model: one vocabulary for
bytes and image tokens, the modality mask, and the token-discrepancy loss.

Vocabulary (:class:`TokenLayout`, codebook of ``K`` codes)::

    0 .. 255          bytes
    256 .. 255 + K    image tokens: the code ids of the VQ-VAE (neatlm.nn.vq), one per map cell
    256 + K           <boi>  begin of image
    257 + K           <eoi>  end of image

The modality decision is a logit mask (:func:`allowed_next`): after ``<boi>`` or an image token
the next token must be an image token or ``<eoi>``; anywhere else a byte or ``<boi>``. The mask
is a function of the current input token alone, so it is causal, and it holds for any
well-formed stream: a byte can never be predicted inside an image span nor a code outside one.

The token-discrepancy loss (MVoT, eq. 2-3): at a position whose target is code ``c``, with ``P``
the predicted distribution over the image tokens, ``L_D = sum_j P_j * S[c, j]``, where ``S[c, j]``
is the distance between the embeddings of codes ``c`` and ``j`` in the VQ-VAE's codebook.
Cross-entropy rewards only the right code; this term also tells the model how wrong a wrong code
is, in pixels. It is zero when all mass is on ``c`` (``S[c, c] = 0``) and grows with the
distance of where the mass goes. Its gradient with respect to the logits is
``P_j (S[c, j] - sum_k P_k S[c, k])`` (autograd computes it; the tests check it against this
formula and by a float64 gradcheck). The derivation and the choices (the scale of ``S``, the
cost of ``<eoi>``) are in docs/mvot.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .loss import lm_loss
from .model import NeatLM, decoding_mode

BYTES = 256


@dataclass(frozen=True)
class TokenLayout:
    """Where bytes, image tokens, <boi> and <eoi> sit in a vocabulary of ``256 + codebook + 2``."""

    codebook: int

    @property
    def boi(self) -> int:
        return BYTES + self.codebook

    @property
    def eoi(self) -> int:
        return BYTES + self.codebook + 1

    @property
    def vocab_size(self) -> int:
        return BYTES + self.codebook + 2

    def code(self, ids: Tensor) -> Tensor:
        """Image tokens of code ids."""
        return ids + BYTES

    def is_code(self, tokens: Tensor) -> Tensor:
        return (tokens >= BYTES) & (tokens < self.boi)


def in_image(inputs: Tensor, layout: TokenLayout) -> Tensor:
    """True where the token after ``inputs[t]`` belongs to an image span: ``inputs[t]`` is <boi> or
    an image token (an image ends only with <eoi>)."""
    return (inputs >= BYTES) & (inputs != layout.eoi)


def allowed_next(inputs: Tensor, layout: TokenLayout) -> Tensor:
    """Boolean (..., vocab): which tokens may follow each input token (the modality decision)."""
    v = torch.arange(layout.vocab_size, device=inputs.device)
    image_ok = layout.is_code(v) | (v == layout.eoi)                   # (V,) inside an image span
    text_ok = (v < BYTES) | (v == layout.boi)                          # (V,) outside
    return torch.where(in_image(inputs, layout)[..., None], image_ok, text_ok)


def mask_logits(logits: Tensor, inputs: Tensor, layout: TokenLayout) -> Tensor:
    """``logits`` (..., vocab) with every token the modality forbids after ``inputs`` (...) at -inf."""
    return logits.masked_fill(~allowed_next(inputs, layout), float("-inf"))


def discrepancy_costs(distances: Tensor) -> Tensor:
    """(K, K + 1) cost of predicting code j (or <eoi>, the last column) where code i is due.

    ``distances`` (K, K) are the codebook's pairwise mean squared distances; they are divided by
    their mean off the diagonal, so that a weight of 1 means what it means for any codebook
    (spreading the mass evenly over the other codes costs about 1, one nat's worth), and <eoi>
    where a code is due costs the largest distance: ending an image early is as wrong as the
    worst code.
    """
    k = distances.shape[0]
    off = distances[~torch.eye(k, dtype=torch.bool, device=distances.device)]
    scale = off.mean().clamp_min(1e-12) if k > 1 else distances.new_tensor(1.0)
    s = distances / scale
    return torch.cat([s, s.max().expand(k, 1)], dim=1)


def discrepancy(logits: Tensor, targets: Tensor, costs: Tensor, layout: TokenLayout) -> Tensor:
    """Per-position token-discrepancy ``sum_j P_j S[c, j]`` (N,) for image-token ``targets`` (N,),
    from (masked) ``logits`` (N, vocab); ``costs`` from :func:`discrepancy_costs`."""
    p = F.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    k = layout.codebook
    p_image = torch.cat([p[:, BYTES:BYTES + k], p[:, layout.eoi:layout.eoi + 1]], dim=1)   # (N, K + 1)
    return (p_image * costs.to(p_image.dtype)[targets - BYTES]).sum(-1)


class MVoTLoss:
    """The training objective of an MVoT run: ``loss(logits, targets, inputs)`` is the summed
    cross-entropy of the masked logits over the scored targets plus ``weight`` times the summed
    token-discrepancy over the image-token targets. ``logits`` (..., vocab) and ``targets``,
    ``inputs`` (...) are aligned (all positions, or the scored ones).

    ``layout`` None: a text-only run (bytes, no mask, no discrepancy): plain cross-entropy.
    """

    def __init__(self, layout: TokenLayout | None, distances: Tensor | None = None, weight: float = 0.0):
        self.layout, self.weight = layout, weight
        self.costs = discrepancy_costs(distances) if distances is not None else None

    def mask(self, logits: Tensor, inputs: Tensor) -> Tensor:
        return logits if self.layout is None else mask_logits(logits, inputs, self.layout)

    def __call__(self, logits: Tensor, targets: Tensor, inputs: Tensor) -> Tensor:
        masked = self.mask(logits, inputs)
        loss = lm_loss(masked, targets, reduction="sum")
        if self.layout is not None and self.costs is not None and self.weight > 0:
            image = self.layout.is_code(targets)
            if bool(image.any()):
                costs = self.costs.to(logits.device)
                flat = masked.reshape(-1, masked.shape[-1])[image.reshape(-1)]
                loss = loss + self.weight * discrepancy(flat, targets[image], costs, self.layout).sum()
        return loss


def generate_masked(model: NeatLM, prompt: Tensor, layout: TokenLayout | None, max_new: int,
                    stop: Callable[[list[int]], bool], temperature: float = 0.0,
                    generator: torch.Generator | None = None) -> list[int]:
    """Tokens after ``prompt`` (1-D), the modality mask applied at every step, until ``stop`` says
    so (it sees the tokens so far) or ``max_new`` tokens. Greedy at ``temperature`` 0. The state
    is carried: the prompt is read once, then one token per call."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature = {temperature!r}: must be a finite number >= 0")
    was_training = model.training
    model.eval()
    out: list[int] = []
    try:
        with decoding_mode(model):
            logits, state, _, _ = model(prompt[None])
            last_input = prompt[-1]
            for _ in range(max_new):
                last = logits[0, -1].float()
                if layout is not None:
                    last = mask_logits(last, last_input, layout)
                if temperature <= 0:
                    nxt = last.argmax()
                else:
                    nxt = torch.multinomial(F.softmax(last / temperature, dim=-1), 1, generator=generator)[0]
                out.append(int(nxt))
                if stop(out):
                    break
                last_input = nxt
                logits, state, _, _ = model(nxt.view(1, 1), state)
    finally:
        model.train(was_training)
    return out
