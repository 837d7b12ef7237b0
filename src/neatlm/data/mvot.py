"""MVoT sequences: grid-world examples as byte text, with or without the visual thoughts.

With thoughts (``mvot.thoughts = true``), one example is::

    map 4x4\\nS..H\\n.H..\\n...H\\nH..G\\nmoves 1R 2D 3D\\n <boi> c c ... c <eoi>      <- the prompt
    1R <boi> c ... c <eoi>  2D <boi> ... <eoi>  3D <boi> ... <eoi>  \\nanswer: hole\\n  <- generated

where ``c`` are the VQ-VAE's image tokens of the rendered state (one per cell, raster order): the
prompt ends with the image of the initial state (the paper's input image), and the model writes,
for each step, its number and move and the image of the state it leads to, then the answer.
Without thoughts (``mvot-text``) the same example is the prompt's text, then ``answer: hole\\n``. Only what the
model would write is scored (the targets of the prompt are IGNORE_INDEX), and padding after the
example is neither read as context (it comes after) nor scored.

Batch ``i`` of the sampler holds training examples ``(seed, i)``; validation and test examples
come from maps of their own split (:func:`neatlm.data.gridworld.split_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DataError
from ..nn.loss import IGNORE_INDEX
from ..nn.mvot import TokenLayout
from ..nn.vq import VQVAE, VQSettings, images_to_tensor, load_vq
from .corpus import PositionedSampler
from .gridworld import ANSWER, GridExample, GridSettings, header, make_example, renderings


@torch.no_grad()
def encode_states(vq: VQVAE, examples: list[GridExample]) -> list[list[list[int]]]:
    """The image tokens' code ids of every state of every example: ``[example][state]`` a list of
    ``n * n`` ids in raster order. Images of one size go through the VQ-VAE together."""
    out: list[list[list[int]]] = [[] for _ in examples]
    by_size: dict[int, list[tuple[int, object]]] = {}
    for i, ex in enumerate(examples):
        for img in renderings(ex):
            by_size.setdefault(ex.size, []).append((i, img))
    for items in by_size.values():
        codes = vq.encode(images_to_tensor([img for _, img in items])).flatten(1)   # (N, n * n)
        for (i, _), row in zip(items, codes.tolist()):
            out[i].append(row)
    return out


def example_tokens(ex: GridExample, codes: list[list[int]] | None,
                   layout: TokenLayout | None) -> tuple[list[int], int]:
    """(tokens, prompt length): the whole example as tokens, and how many of them are the prompt.
    ``codes``: the code ids of each state (None: text only, no thoughts)."""
    tokens = list(header(ex))
    if codes is None or layout is None:
        return tokens + list(f"{ANSWER}{ex.outcome}\n".encode()), len(tokens)

    def image(ids: list[int]) -> list[int]:
        return [layout.boi, *(256 + c for c in ids), layout.eoi]

    tokens += image(codes[0])
    prompt = len(tokens)
    for k, (move, ids) in enumerate(zip(ex.moves, codes[1:]), 1):
        tokens += [*f"{k}{move}".encode(), *image(ids)]
    tokens += list(f"\n{ANSWER}{ex.outcome}\n".encode())
    return tokens, prompt


def batch_tensors(sequences: list[tuple[list[int], int]], length: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of shape (B, length): inputs padded with byte 0, targets the next token
    where it is generated (after the prompt), IGNORE_INDEX elsewhere."""
    inputs = torch.zeros(len(sequences), length, dtype=torch.long)
    targets = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for b, (tokens, prompt) in enumerate(sequences):
        n = len(tokens) - 1
        if n > length:
            raise ValueError(f"an example of {n} tokens does not fit a window of {length}")
        ids = torch.tensor(tokens)
        inputs[b, :n] = ids[:-1]
        targets[b, prompt - 1:n] = ids[prompt:]
    return inputs, targets


@dataclass
class MVoTTask:
    """What a run's examples become: the settings, the vocabulary layout and the frozen VQ-VAE
    (None, both, for a text-only run)."""

    settings: GridSettings
    layout: TokenLayout | None
    vq: VQVAE | None
    length: int          # tokens per window

    def sequences(self, examples: list[GridExample]) -> list[tuple[list[int], int]]:
        if self.vq is None:
            return [example_tokens(ex, None, None) for ex in examples]
        codes = encode_states(self.vq, examples)
        return [example_tokens(ex, c, self.layout) for ex, c in zip(examples, codes)]

    def batch(self, split: str, indices: list[int]) -> tuple[Tensor, Tensor]:
        examples = [make_example(split, i, self.settings) for i in indices]
        return batch_tensors(self.sequences(examples), self.length)


class MVoTSampler(PositionedSampler):
    """Training batches: row ``b`` of batch ``i`` is training example ``seed * 10_000_019 + i * B + b``."""

    def __init__(self, task: MVoTTask, batch_size: int, seed: int, position: int = 0):
        self.task, self.batch_size, self.seed, self.position = task, batch_size, seed, position

    def next(self) -> tuple[Tensor, Tensor]:
        first = self.seed * 10_000_019 + self.position * self.batch_size
        self.position += 1
        return self.task.batch("train", list(range(first, first + self.batch_size)))


def load_task(settings: GridSettings, vq_settings: VQSettings, length: int) -> MVoTTask:
    """The task of an MVoT config (``settings`` is its ``[mvot]``): with thoughts, the frozen
    codebook model read from ``mvot.vq_run``, which must have ``vq.codebook`` codes."""
    if not getattr(settings, "thoughts", False):
        return MVoTTask(settings, None, None, length)
    vq = load_vq(settings.vq_run, "mvot.vq_run =")
    if vq.size != vq_settings.codebook:
        raise DataError(f"mvot.vq_run = {settings.vq_run!r}: its codebook has {vq.size} codes, but vq.codebook = "
                        f"{vq_settings.codebook} (and model.vocab_size is sized for it); set vq.codebook = {vq.size} "
                        f"and model.vocab_size = {256 + vq.size + 2}")
    for p in vq.parameters():
        p.requires_grad_(False)
    return MVoTTask(settings, TokenLayout(vq.size), vq, length)
