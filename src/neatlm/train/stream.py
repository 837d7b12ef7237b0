"""Streaming evaluation: each held-out document read whole, in order, as one sequence.

A model with test-time memory is meant to use context that its attention window cannot hold, so
it is measured the way it would be used on a long document: the file is fed ``call_len`` bytes at
a time, the model state (sliding-window KV cache, memory fast weights) carried from call to call
and detached, the memory learning as it reads. Memory use is bounded by the window and the call
length, whatever the file length. Losses are reported overall and by position in the file
(``0-256``, ``256-1K``, ``1K-4K``, ``4K-16K``, ``16K+`` bytes in), so a memory that keeps paying
far into a file shows up in the far buckets.

A model trained with full attention (``model.window = 0``) has a KV cache that would grow with the
file; it is evaluated with its training context as the window (RoPE is relative, so the weights
are unchanged): :func:`streaming_model` builds that copy.

General-purpose compressors, each compressing every file on its own, give a reference point in
the same units: :func:`compressor_bits_per_byte`.
"""

from __future__ import annotations

import bz2
import copy
import lzma
import math
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..data.passkey import passkey_accuracy, passkey_batch, passkey_digit_accuracy
from ..nn.memory import TTLControl
from ..nn.loss import lm_loss
from ..nn.build import build_model
from ..nn.model import ModelOutput, NeatLM
from .state_io import detach_state

BUCKETS = (256, 1024, 4096, 16384)          # upper edges in bytes; the last bucket is open
BUCKET_NAMES = ("0-256", "256-1K", "1K-4K", "4K-16K", "16K+")


@dataclass
class StreamResult:
    """Summed nats and counts of predicted bytes, overall and per position bucket; with
    ``collect_stats``, the memory's inner-loop statistics summed per bucket of the call's start."""

    nats: list[float] = field(default_factory=lambda: [0.0] * len(BUCKET_NAMES))
    count: list[int] = field(default_factory=lambda: [0] * len(BUCKET_NAMES))
    stat_sums: dict[str, list[float]] = field(default_factory=dict)
    stat_calls: list[int] = field(default_factory=lambda: [0] * len(BUCKET_NAMES))

    def add_stats(self, bucket: int, stats: dict[str, torch.Tensor]) -> None:
        """Add one call's statistics, averaged over memory layers (``ttl/layer{i}/{name}`` keys)."""
        per_name: dict[str, list[float]] = {}
        for key, value in stats.items():
            per_name.setdefault(key.rsplit("/", 1)[-1], []).append(float(value))
        if not per_name:
            return
        for name, values in per_name.items():
            self.stat_sums.setdefault(name, [0.0] * len(BUCKET_NAMES))[bucket] += sum(values) / len(values)
        self.stat_calls[bucket] += 1

    def memory_stats(self) -> dict[str, dict[str, float]]:
        """{statistic: {bucket: mean over calls starting in it}}, e.g. how the memory's inner loss on
        data it has not yet learned from (``inner_loss_before``) moves along a file."""
        return {name: {b: sums[i] / self.stat_calls[i] if self.stat_calls[i] else math.nan
                       for i, b in enumerate(BUCKET_NAMES)}
                for name, sums in self.stat_sums.items()}

    def bits_per_byte(self) -> dict[str, float]:
        """{"all": ..., "0-256": ..., ...}; NaN for an empty bucket."""
        out = {"all": _bpb(sum(self.nats), sum(self.count))}
        out.update({name: _bpb(n, c) for name, n, c in zip(BUCKET_NAMES, self.nats, self.count)})
        return out


def _bpb(nats: float, count: int) -> float:
    return nats / count / math.log(2) if count else math.nan


def _bucket_of(positions: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(positions, torch.tensor(BUCKETS), right=True)


def streaming_model(model: NeatLM) -> NeatLM:
    """``model`` itself if its attention already has a window; otherwise a copy whose attention
    window is the training context (same weights), so that state stays bounded on long files."""
    if model.cfg.model.window > 0:
        return model
    cfg = copy.deepcopy(model.cfg)
    cfg.model.window = cfg.model.context
    windowed = build_model(cfg).to(next(model.parameters()).device)
    windowed.load_state_dict(model.state_dict())
    return windowed


def read_in_calls(model: NeatLM, ids: torch.Tensor, call_len: int,
                  ttl: TTLControl = TTLControl()) -> Iterator[tuple[int, ModelOutput, torch.Tensor]]:
    """Read one document (``ids``, 1-D) ``call_len`` bytes per call, the state carried from call to
    call and detached: yields ``(start, out, targets)`` per call, where ``targets`` (1, n) are the
    bytes ``start + 1 .. start + n`` that ``out.logits`` predict. The caller's grad mode applies,
    and it may take an optimizer step between calls (the next call reads the updated weights)."""
    state = None
    for start in range(0, ids.numel() - 1, call_len):
        x = ids[start:start + call_len][None]                  # (1, T)
        y = ids[start + 1:start + 1 + call_len][None]
        out = model(x[:, :y.shape[1]], state, ttl)             # the last call has one target fewer
        state = detach_state(out.state)
        yield start, out, y


@torch.no_grad()
def stream_eval(model: NeatLM, files: Sequence[bytes], call_len: int = 256, learn: bool = True,
                device: torch.device | str = "cpu", collect_stats: bool = False) -> StreamResult:
    """Bits per byte of ``model`` over every file read whole, state carried across calls.

    ``learn`` False keeps the memories at their initial weights (they read, never step), which
    isolates what test-time learning adds. Byte i of a file (i >= 1) is predicted from bytes < i;
    its position bucket is i. ``collect_stats`` also gathers the memories' inner-loop statistics
    per bucket (:meth:`StreamResult.memory_stats`).
    """
    if call_len < 1:
        raise ValueError(f"call_len = {call_len}: must be >= 1")
    was_training = model.training
    model.eval()
    ttl = TTLControl(learn=learn, collect_stats=collect_stats)
    result = StreamResult()
    for data in files:
        if len(data) < 2:     # an empty or one-byte file has nothing to predict
            continue
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long().to(device)
        for start, out, y in read_in_calls(model, ids, call_len, ttl):
            nats = lm_loss(out.logits, y, reduction="none").double().cpu()   # (T,)
            positions = torch.arange(start + 1, start + 1 + y.shape[1])
            bucket = _bucket_of(positions)
            if collect_stats:
                result.add_stats(int(bucket[0]), out.stats)
            for b in range(len(BUCKET_NAMES)):
                mask = bucket == b
                if mask.any():
                    result.nats[b] += float(nats[mask].sum())
                    result.count[b] += int(mask.sum())
    model.train(was_training)
    return result


def compressor_bits_per_byte(files: Sequence[bytes]) -> dict[str, float]:
    """zlib -9, bz2 -9 and xz -9e, each compressing every file on its own: total compressed bits
    over total bytes."""
    total = sum(len(d) for d in files)
    if total == 0:
        return {"zlib": math.nan, "bz2": math.nan, "xz": math.nan}
    sizes = {
        "zlib": sum(len(zlib.compress(d, 9)) for d in files),
        "bz2": sum(len(bz2.compress(d, 9)) for d in files),
        "xz": sum(len(lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)) for d in files),
    }
    return {name: 8 * size / total for name, size in sizes.items()}


@dataclass
class PasskeyScore:
    """Passkey accuracy at one length: every digit right (RULER's score, chance 1e-5 for five
    digits) and per digit (chance 0.1)."""

    all_digits: float
    per_digit: float


def passkey_eval(model: NeatLM, haystack, lengths: Sequence[int], examples: int = 20, call_len: int = 256,
                 learn: bool = True, seed: int = 0, digits: int = 5,
                 device: torch.device | str = "cpu") -> dict[int, float]:
    """Passkey retrieval accuracy (every answer digit right) at each haystack length.

    Each example is read ``call_len`` bytes at a time with the state carried, so memory stays
    bounded at any length; only the logits of the answer positions are kept.
    ``haystack``: uint8 held-out text the needles are hidden in.
    """
    scores = passkey_scores(model, haystack, lengths, examples, call_len, learn, seed, digits, device)
    return {length: score.all_digits for length, score in scores.items()}


@torch.no_grad()
def passkey_scores(model: NeatLM, haystack, lengths: Sequence[int], examples: int = 20, call_len: int = 256,
                   learn: bool = True, seed: int = 0, digits: int = 5,
                   device: torch.device | str = "cpu") -> dict[int, PasskeyScore]:
    """:func:`passkey_eval` with the per-digit accuracy as well, from the same logits."""
    was_training = model.training
    model.eval()
    ttl = TTLControl(learn=learn)
    scores = {}
    for length in lengths:
        x, y = passkey_batch(haystack, examples, length, seed=seed + length, digits=digits)
        x, answer = x.to(device), length - digits         # targets from ``answer`` on are the digits
        state, kept = None, []
        for start in range(0, length, call_len):
            out = model(x[:, start:start + call_len], state, ttl)
            state = detach_state(out.state)
            if start + call_len > answer:
                kept.append(out.logits[:, max(answer - start, 0):].float().cpu())
        logits, targets = torch.cat(kept, 1), y[:, answer:]
        scores[length] = PasskeyScore(passkey_accuracy(logits, targets), passkey_digit_accuracy(logits, targets))
    model.train(was_training)
    return scores
