"""Where patches start, decided causally from next-byte entropies (Byte Latent Transformer, sec. 2).

``H(x_i)`` is the entropy of the entropy model's distribution over byte ``i`` given the bytes
before it, so whether byte ``i`` starts a patch is known once byte ``i - 1`` has been read: a
decoder predicting byte ``i`` already knows whether the patch holding ``i - 1`` is complete.

Patchers (one rule each, then the maximum length):

- ``entropy``: a patch starts where ``H(x_i) > theta`` (the global threshold);
- ``monotonic``: where ``H(x_i) - H(x_{i-1}) > theta`` (the approximate monotonic constraint);
- ``stride``: every ``stride`` bytes of the stream (the fixed-size baseline);
- every patcher: a patch that reaches ``max_patch`` bytes ends there.

The first byte of a stream starts a patch. :func:`patch_starts` works on one call's bytes with a
carried :class:`PatchCursor`, so that the boundaries of a prefix are a prefix of the boundaries
and a stream cut anywhere gets the boundaries it gets whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PatchCursor:
    """Where a stream stands between calls (every tensor has the batch first).

    position: absolute index of the next byte (the stride patcher counts from the stream start).
    next_start: (B,) bool, whether the next byte starts a patch (already decided: it depends on
        bytes read so far only).
    next_entropy: (B,) H of the next byte; last_entropy: (B,) H of the byte before it.
    run: (B,) long, bytes of the open patch before the next byte (0 when ``next_start``).
    """

    position: int
    next_start: Tensor
    next_entropy: Tensor
    last_entropy: Tensor
    run: Tensor


def entropy_of(logits: Tensor) -> Tensor:
    """Entropy in nats of each softmax distribution over the last dimension, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _data_starts(entropies: Tensor, before: Tensor, position: int, patcher: str, threshold: float,
                 stride: int) -> Tensor:
    """The patcher's own rule at each of ``entropies``' positions (B, n), before the length cap.
    ``before``: (B,) the entropy of the byte just before the first one."""
    if patcher == "entropy":
        return entropies > threshold
    if patcher == "monotonic":
        previous = torch.cat((before[:, None], entropies[:, :-1]), dim=1)
        return entropies - previous > threshold
    if patcher == "stride":
        index = torch.arange(position, position + entropies.shape[1], device=entropies.device)
        return (index % stride == 0).expand(entropies.shape[0], -1)
    raise ValueError(f"unknown patcher {patcher!r}")


def patch_starts(entropies: Tensor, cursor: PatchCursor | None, patcher: str, threshold: float, stride: int,
                 max_patch: int) -> tuple[Tensor, Tensor, PatchCursor]:
    """Patch starts of one call's bytes.

    entropies: (B, T + 1) float, H of each byte of the call and of the byte after it (the last
        column comes from the last byte's prediction).
    cursor: the stream's :class:`PatchCursor`, None at the stream start.

    Returns ``starts`` (B, T) bool, ``ends`` (B, T) bool (byte t ends a patch: byte t + 1 starts
    one) and the cursor after the call.
    """
    B, n = entropies.shape
    T = n - 1
    dev = entropies.device
    if cursor is None:
        position = 0
        first = torch.ones(B, dtype=torch.bool, device=dev)
        before = torch.full((B,), float("nan"), device=dev)
        run = torch.zeros(B, dtype=torch.long, device=dev)
    else:
        position, first, before, run = cursor.position, cursor.next_start, cursor.last_entropy, cursor.run
    # columns 1..T: the patcher's rule, then the cap; column 0 was decided by the previous call
    data = _data_starts(entropies[:, 1:], entropies[:, 0], position + 1, patcher, threshold, stride)
    data = torch.cat((first[:, None], data), dim=1)                        # (B, T + 1)
    index = torch.arange(n, device=dev).expand(B, -1)
    # the last data start at or before each column; before any, the open patch's start (-run)
    last = torch.where(data, index, torch.full_like(index, -(1 << 40))).cummax(dim=1).values
    last = torch.where(last < -(1 << 39), -run[:, None], last)
    since = index - last
    starts_all = data | ((since > 0) & (since % max_patch == 0))
    # the open patch before column T began at the last start among columns 0..T-1
    last_any = torch.where(starts_all[:, :T], index[:, :T], torch.full_like(index[:, :T], -(1 << 40)))
    last_any = last_any.max(dim=1).values if T > 0 else torch.full((B,), -(1 << 40), device=dev)
    run_next = torch.where(last_any < -(1 << 39), run + T, T - last_any)
    run_next = torch.where(starts_all[:, T], torch.zeros_like(run_next), run_next)
    last_entropy = entropies[:, T - 1] if T > 0 else before
    nxt = PatchCursor(position + T, starts_all[:, T], entropies[:, T], last_entropy, run_next)
    return starts_all[:, :T], starts_all[:, 1:], nxt


def average_patch(entropies: Tensor, patcher: str, threshold: float, max_patch: int) -> float:
    """Mean patch length of streams with these entropies ((B, T + 1), as :func:`patch_starts`
    takes them), each read from its start."""
    starts, _, _ = patch_starts(entropies, None, patcher, threshold, 1, max_patch)
    return starts.numel() / max(int(starts.sum()), 1)


def measured_threshold(entropies: Tensor, patcher: str, target_patch_size: float, max_patch: int,
                       iterations: int = 40) -> float:
    """The threshold at which the patcher's patches of these streams ((B, T + 1) entropies) average
    ``target_patch_size`` bytes, the length cap included: a bisection, since the average grows with
    the threshold. Patchers compared at one target then do the same global work per byte."""
    values = entropies if patcher == "entropy" else entropies[:, 1:] - entropies[:, :-1]
    low, high = float(values.min()) - 1.0, float(values.max()) + 1.0   # one byte per patch .. only the cap
    for _ in range(iterations):
        mid = (low + high) / 2
        if average_patch(entropies, patcher, mid, max_patch) < target_patch_size:
            low = mid
        else:
            high = mid
    return high
